"""One flush of the worker, as per-partition links: dedupe -> rows -> chained, token-deduplicated
commits -> verification -> index. Pure apart from the dedupe index and the sink (no Kafka here).

docs/architecture.md, "The worker's commit protocol", explains why this is exactly-once. In short:

- Messages are buffered per partition. ``seal()`` turns a partition's buffer into a *link*
  ``[first, last]`` with ``first`` = the chain end the worker knows + 1 (the store progress read
  at assignment, then the end of each verified link). A sealed link is retried unchanged (same
  range, same rows, same token) until it is resolved; newer messages wait behind it.
- ``prepare()`` computes a link's rows once: dedupe against the events kept earlier in the link
  and the partition's index (the first copy by (offset, index in envelope) wins), the ledger
  rows, and the minute windows of that partition only. Given a ``ledger_executor``, it inserts
  the ledger rows on that thread while it computes the windows (the store's insert and the
  windows overlap), and the link's first attempt then skips step (a).
- ``flush_batch()`` is one attempt at the store: (0) read progress + claims (one query): links
  already covered are resolved without writing, a fenced partition is dropped; (a) INSERT the
  kept events (idempotent; not on a first attempt whose rows ``prepare`` inserted); (b) meter
  activations (reserved slot); (c) per link ONE insert of its usage rows + progress row with the token ``chain_token(topic, p, first)``; (d) read progress +
  claims again and judge each link: ``M == last`` stored; ``M >= first`` another writer's link
  covers ``[first, M]`` -> resync; anything else (or a failed read) is *unknown*: retry the same
  link later. A failed or unanswered read is never taken as "not landed". Then ``on_stored``
  (optional) is told what the read showed stored, for the requests waiting on it
  (``wait=stored``), the kept ids of stored links go into the index, and resynced partitions'
  indexes are rebuilt up to ``M``.
- ``apply()`` (the caller's thread) moves the chain ends and returns what to ack: a stored link's
  messages, a resynced partition's messages up to ``M`` (the rest goes back to the buffer for a
  new link from ``M + 1``, recomputed). Fenced partitions are dropped without ack.

Control messages (``schemas.control``) travel in the same partitions: an ``activate_meter`` marker
starts its meter in its partition (``streams.activation``); a link holding a meter's first marker
in a partition writes its activation row at step (b), before its usage commit. A resync reloads
the partition's activations from the store up to ``M`` (markers in another writer's link).

Dead letters (``schemas.deadletters``, ``streams.deadletters``): a message that is not an
envelope or control message, a bad event of a good envelope, an event whose properties cannot be
stored and an event a meter cannot count are collected per link in ``prepare`` and written at
step (b), before the link's usage commit, like the activation rows (deterministic rows keyed by
source position: a replay writes the same rows). The message's offset is committed like any
other: a bad message never blocks its partition.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import numpy as np
import orjson
import pyarrow as pa

from schemas.columns import EVENTS_SCHEMA, empty_events, empty_usage
from schemas.control import Control, ControlError, decode_control, is_control
from schemas.deadletters import DeadLetter, DeadLetterRow
from schemas.envelope import (
    EnvelopeColumns,
    EnvelopeError,
    EnvelopeEvent,
    decode_columns,
    json_texts,
)
from schemas.meters import Meter
from schemas.worker import ChainState, Claim
from streams import deadletters
from streams.activation import NO_MARKER, Activations
from streams.columnar import ColumnarResult, KeptEvents, Threshold, aggregate_links
from streams.dedupe import DedupeIndex, rebuild
from streams.matching import CompiledMeter, MeterIndex
from streams.metrics import WorkerMetrics
from streams.sink import Sink, chain_token

log = logging.getLogger(__name__)

METER_RELOAD_MS = 2_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class MeterCache:
    """Compiled meters from the store, reloaded when a batch holds activation markers and at least
    every ``reload_ms`` (deleted meters stop counting then).

    A marker carries its meter, so a marker activates the meter even if the reload fails (the
    marker's meter is added to the last good index until the next successful reload). The very
    first load must succeed: without it the meters activated earlier are unknown.
    """

    def __init__(
        self,
        load: Callable[[], list[Meter]],
        clock_ms: Callable[[], int] = _now_ms,
        reload_ms: int = METER_RELOAD_MS,
    ):
        self._load = load
        self._clock = clock_ms
        self.reload_ms = reload_ms
        self.loaded_ms = -1
        self.index = MeterIndex([])

    def ensure(self, markers: Sequence[Meter] = ()) -> MeterIndex:
        now = self._clock()
        if not markers and self.loaded_ms >= 0 and now - self.loaded_ms < self.reload_ms:
            return self.index
        try:
            meters = self._load()
        except Exception as exc:
            if self.loaded_ms < 0:
                raise
            log.warning("meter reload failed, using the last loaded meters: %r", exc)
            missing = [m for m in markers if m.id not in self.index.by_id]
            if missing:
                known = [cm.meter for cm in self.index.by_id.values()]
                self.index = MeterIndex(known + missing, self.index)
            return self.index
        self.index = MeterIndex(meters, self.index)
        self.loaded_ms = now
        log.debug("meters reloaded: %d meters", len(self.index))
        return self.index


def _json_texts_checked(objs: list[Any]) -> tuple[list[bytes], list[tuple[int, Exception]]]:
    """``json_texts`` and the positions of the objects orjson cannot encode (with the error);
    their texts are empty."""
    try:
        return json_texts(objs), []
    except orjson.JSONEncodeError:
        pass
    texts: list[bytes] = []
    bad: list[tuple[int, Exception]] = []
    for g, o in enumerate(objs):
        try:
            texts.append(orjson.dumps(o))
        except orjson.JSONEncodeError as exc:
            bad.append((g, exc))
            texts.append(b"")
    return texts, bad


def _spread(values: list[Any], counts: list[int]) -> list[Any]:
    """Each of ``values`` repeated its count of times, in order (an envelope's value for each
    of its events)."""
    return list(itertools.chain.from_iterable(map(itertools.repeat, values, counts)))


class _Origin(NamedTuple):
    """An event's envelope (tenant, ingestion time), for its dead letter."""

    tenant_id: str
    ingested_at_ms: int


_EMPTY_EVENTS = empty_events()
_EMPTY_USAGE = empty_usage()


def _mono() -> float:
    return time.monotonic()


class Verdict(Enum):
    STORED = "stored"  # the store's chain ends exactly where this link ends
    RESYNC = "resync"  # another link covers [first, M]: adopt M, redo the rest
    FENCED = "fenced"  # a newer claim of another owner: stop committing the partition
    UNKNOWN = "unknown"  # could not tell (store error, failed read): retry the same link


@dataclass(slots=True)
class Entry:
    partition: int
    offset: int
    envelope: EnvelopeColumns | None  # None: poison or control message
    handle: Any = None  # what the caller acks once the entry is stored (a Faust event)
    control: Control | None = None  # an activation marker (streams.activation)
    problem: DeadLetter | None = None  # a message the worker cannot read (a dead letter)
    timestamp_ms: int | None = None  # the message's broker timestamp (kept with dead letters)


@dataclass
class Link:
    """A sealed piece of one partition's chain: offsets ``[first, last]``, retried unchanged."""

    partition: int
    first: int
    last: int
    entries: list[Entry]
    generation: int
    token: str
    prepared: bool = False
    # schemas.columns.EVENTS_SCHEMA / USAGE_SCHEMA (one shared empty table each until prepared:
    # Arrow tables are immutable, and making them per link cost ~0.2 ms each)
    events: pa.Table = field(default_factory=lambda: _EMPTY_EVENTS)
    usage: pa.Table = field(default_factory=lambda: _EMPTY_USAGE)
    # the (tenant, id) of every kept event and its envelope's ingestion time (for the index)
    kept_keys: list[tuple[str, str]] = field(default_factory=list)
    kept_ingested_ms: list[int] = field(default_factory=list)
    activation_rows: list[tuple[str, str, str, int, int]] = field(default_factory=list)
    dead_letter_rows: list[DeadLetterRow] = field(default_factory=list)
    events_in: int = 0
    duplicates: int = 0
    value_errors: int = 0
    late: int = 0  # kept events whose time is more than late_ms before their acceptance
    attempts: int = 0
    first_attempt: float | None = None  # monotonic seconds of the first insert attempt
    # its ledger rows landed while its windows were computed (``BatchProcessor.prepare`` with a
    # ledger executor): its first attempt skips step (a); a retry inserts them again
    ledger_ahead: bool = False

    @property
    def event_count(self) -> int:
        return sum(len(e.envelope) for e in self.entries if e.envelope is not None)


@dataclass
class Outcome:
    """What one attempt found out, per partition: (verdict, store progress M)."""

    verdicts: dict[int, tuple[Verdict, int]] = field(default_factory=dict)
    error: BaseException | None = None
    inserts: int = 0  # commit inserts sent (landed or not)
    read_reused: bool = False  # step (0) used the previous attempt's verified read


@dataclass
class Applied:
    acks: list[Entry] = field(default_factory=list)
    stored: dict[int, int] = field(default_factory=dict)  # partition -> new chain end
    resynced: dict[int, int] = field(default_factory=dict)
    fenced: list[int] = field(default_factory=list)
    unresolved: list[int] = field(default_factory=list)

    @property
    def progress(self) -> dict[int, int]:
        return {**self.resynced, **self.stored}


class _Verified(NamedTuple):
    """What this worker's read after a stored link of a partition showed."""

    generation: int  # the partition's assignment then (a reassignment makes it stale)
    read_at: float  # monotonic seconds when the read started
    chain_end: int  # M, the link's last offset
    mark: int  # the store's position that read saw (``ChainState.mark``)


# How old this worker's read after a stored link may be for the next link of the partition to
# skip its read before (step 0 of ``BatchProcessor.flush_batch``): flushes under load follow each
# other within it; an idle partition's next link reads again.
REUSE_READ_S = 1.0


def _landed(insert: Future[None]) -> bool:
    """Whether an insert of ledger rows ahead of the commit landed (a failure is not an error:
    the commit attempt inserts the rows itself)."""
    try:
        insert.result()
    except Exception as exc:
        log.info("ledger insert ahead of the commit failed (the commit attempt inserts): %r", exc)
        return False
    return True


class LinkUnresolved(Exception):
    """A commit attempt ended without knowing whether a link is stored; retry the same link."""


class BatchProcessor:
    """Per-partition buffers, sealed links and the commit protocol over them.

    ``assign(p, M, epoch)`` must be called (with the store's progress and the claim the worker
    wrote) before messages of ``p`` are added; messages with offset <= the highest offset seen
    are skipped. Not thread-safe by itself: the worker calls ``add``/``seal``/``apply``/``assign``/
    ``revoke`` on its event loop and ``prepare``/``flush_batch`` in ONE executor thread, never two
    attempts at once. ``ledger_executor`` (optional, one thread): ``prepare`` inserts the ledger
    rows there while it computes the windows, and waits for that insert before it returns (the
    sink is never called from two of the processor's threads at once).
    """

    def __init__(
        self,
        topic: str,
        sink: Sink,
        index_for: Callable[[int], DedupeIndex],
        *,
        meters: MeterCache | None = None,
        clock_ms: Callable[[], int] = _now_ms,
        horizon_ms: int = 35 * 86_400_000,
        owner: str = "",
        link_max_age_s: float = 300.0,
        monotonic: Callable[[], float] = _mono,
        dead_letter_max_bytes: int = 1 << 20,
        metrics: WorkerMetrics | None = None,
        late_ms: int = 60_000,
        reuse_read_s: float = REUSE_READ_S,
        ledger_executor: Executor | None = None,
        on_stored: Callable[[int, int], None] | None = None,
    ) -> None:
        self.ledger_executor = ledger_executor
        self.ledger_ahead_failures = 0  # inserts while preparing that failed (the attempt did them)
        # told (partition, offset) on the flush thread as soon as a read shows the store holds
        # a partition's offsets up to ``offset`` (before the index step and ``apply``)
        self.on_stored = on_stored
        self.horizon_ms = horizon_ms
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.late_ms = late_ms
        self.topic = topic
        self.sink = sink
        self.index_for = index_for
        self.meters = meters if meters is not None else MeterCache(sink.all_meters, clock_ms)
        self.clock_ms = clock_ms
        self.owner = owner  # '' = no claims: fencing by claims off (the tokens still hold)
        self.link_max_age_s = link_max_age_s
        self.reuse_read_s = reuse_read_s
        # partition -> its last verified reading (flush thread only; see ``_reading``)
        self._verified: dict[int, _Verified] = {}
        self.monotonic = monotonic
        self._high: dict[int, int] = {}  # highest offset taken (buffered, sealed or stored)
        self._chain: dict[int, int] = {}  # end of the store's chain as this worker knows it
        self._epoch: dict[int, int] = {}  # epoch of this worker's claim
        self._gen: dict[int, int] = {}  # bumped at every assign/revoke: stale results are ignored
        self._buffer: dict[int, list[Entry]] = {}
        self._sealed: dict[int, Link] = {}
        self._buffered_events = 0  # events in _buffer (kept in step: read per message)
        self._next_gen = 0
        self.activations = Activations(topic)

    # --- assignment -----------------------------------------------------------------------
    def assign(self, partition: int, store_progress: int, epoch: int = 0) -> None:
        self._next_gen += 1
        self._gen[partition] = self._next_gen
        self._high[partition] = store_progress
        self._chain[partition] = store_progress
        self._epoch[partition] = epoch
        self.activations.assign(partition, store_progress)  # loaded by the next prepare
        self._drop_buffer(partition)
        self._sealed.pop(partition, None)

    @staticmethod
    def _events_of(entries: list[Entry]) -> int:
        return sum(len(e.envelope) for e in entries if e.envelope is not None)

    def _drop_buffer(self, partition: int) -> list[Entry]:
        entries = self._buffer.pop(partition, [])
        self._buffered_events -= self._events_of(entries)
        return entries

    def revoke(self, partition: int) -> list[Entry]:
        """Forget a partition: its buffered and sealed messages are dropped (not acked) and
        returned; a result of an attempt still in flight for it will be ignored."""
        self._next_gen += 1
        self._gen.pop(partition, None)
        self._high.pop(partition, None)
        self._chain.pop(partition, None)
        self._epoch.pop(partition, None)
        self.activations.revoke(partition)
        dropped = self._drop_buffer(partition)
        link = self._sealed.pop(partition, None)
        return (link.entries if link is not None else []) + dropped

    def assigned(self, partition: int) -> bool:
        return partition in self._gen

    @property
    def partitions(self) -> list[int]:
        return sorted(self._gen)

    def chain_end(self, partition: int) -> int:
        return self._chain[partition]

    # --- buffering ------------------------------------------------------------------------
    def add(
        self,
        partition: int,
        offset: int,
        payload: bytes | None,
        handle: Any = None,
        timestamp_ms: int | None = None,
    ) -> bool:
        """Buffer one message. False if it is already stored/taken (skip it, ack it). A message
        the worker cannot read is buffered as a dead letter (committed like any other)."""
        high = self._high.get(partition)
        if high is None:
            raise ValueError(f"partition {partition} of {self.topic} is not assigned")
        if offset <= high:
            self.metrics.skipped.inc()
            return False
        self._high[partition] = offset
        control: Control | None = None
        env: EnvelopeColumns | None = None
        problem: DeadLetter | None = None
        try:
            if not payload:
                problem = deadletters.of_message(payload, None)
            elif is_control(payload):
                control = decode_control(payload)
            else:
                env = decode_columns(payload)
        except (EnvelopeError, ControlError) as exc:
            problem = deadletters.of_message(payload, exc)
        if problem is not None:
            self.metrics.poison.inc()
            log.warning(
                "poison message %s[%d]@%d (%s) goes to the dead letters: %s",
                self.topic,
                partition,
                offset,
                problem.reason,
                problem.message,
            )
        self._buffer.setdefault(partition, []).append(
            Entry(partition, offset, env, handle, control, problem, timestamp_ms)
        )
        if env is not None:
            self._buffered_events += len(env)
            self.metrics.consumed.inc(len(env))
        return True

    @property
    def buffered_events(self) -> int:
        """Events buffered and not sealed yet (the back-pressure measure, read per message: a
        running count, kept in step by every change of the buffers)."""
        return self._buffered_events

    @property
    def buffered_messages(self) -> int:
        return sum(len(b) for b in self._buffer.values())

    @property
    def held_messages(self) -> int:
        """Messages taken and not stored yet (buffered + sealed)."""
        return self.buffered_messages + sum(len(k.entries) for k in self._sealed.values())

    @property
    def held_events(self) -> int:
        return self.buffered_events + sum(k.event_count for k in self._sealed.values())

    # --- links ----------------------------------------------------------------------------
    def seal(self) -> list[Link]:
        """Seal the buffer of every partition that has no sealed link into a new link."""
        new: list[Link] = []
        for p in sorted(self._buffer):
            entries = self._buffer[p]
            if not entries or p in self._sealed:
                continue
            self._drop_buffer(p)
            first = self._chain[p] + 1
            last = max(e.offset for e in entries)
            link = Link(p, first, last, entries, self._gen[p], chain_token(self.topic, p, first))
            self._sealed[p] = link
            new.append(link)
        return new

    def links(self) -> list[Link]:
        """The sealed links, by partition."""
        return [self._sealed[p] for p in sorted(self._sealed)]

    def prepare(self, links: list[Link]) -> None:
        """Compute the rows of links not prepared yet (once: a sealed link never changes)."""
        todo = [k for k in links if not k.prepared]
        if not todo:
            return
        markers = sorted(
            (e.partition, e.offset, e.control)
            for k in todo
            for e in k.entries
            if e.control is not None
        )
        meter_index = self.meters.ensure([c.meter for _p, _o, c in markers])
        rows = self._activate(markers)
        # The links' windows are computed in one ``aggregate_links`` call (the link is part of
        # every window key): its fixed costs are paid once per flush, not once per link.
        work: list[tuple[KeptEvents, Threshold, Callable[[ColumnarResult], None]]] = []
        for link in todo:
            link.activation_rows = [r for r in rows if r[3] == link.partition]
            work.append(self._link_columns(link))
        # The ledger rows are final now: insert them while the windows are computed (the
        # store's insert is native work, the windows mostly too). They count for nothing before
        # the commit insert, and every copy of them a retry, a replay or another writer inserts
        # is identical (docs/architecture.md, step 2), so writing them before step (0)'s read
        # changes no count.
        ahead: Future[None] | None = None
        if self.ledger_executor is not None:
            events = pa.concat_tables([k.events for k in todo])
            if events.num_rows:
                ahead = self.ledger_executor.submit(self.sink.insert_events, events)
        try:
            results = aggregate_links([(kept, th) for kept, th, _f in work], meter_index)
        finally:
            landed = ahead is not None and _landed(ahead)
        for (_kept, _th, finish), result in zip(work, results, strict=True):
            finish(result)
        if landed:
            for link in todo:
                link.ledger_ahead = True
            self.metrics.flush_rows.labels("events").inc(sum(k.events.num_rows for k in todo))
        elif ahead is not None:
            self.ledger_ahead_failures += 1
            self.metrics.store_errors.inc()

    def _dead_letter_rows(
        self, link: Link, found: list[tuple[int, DeadLetter]]
    ) -> list[DeadLetterRow]:
        """The link's dead letters: unreadable messages, bad events of good envelopes, and
        ``found`` (offset, letter) while computing its rows."""
        stamp = {e.offset: e.timestamp_ms for e in link.entries}
        letters: list[tuple[int, int | None, DeadLetter]] = []
        for e in link.entries:
            if e.problem is not None:
                letters.append((e.offset, e.timestamp_ms, e.problem))
            elif e.envelope is not None and e.envelope.rejected:
                letters.extend(
                    (e.offset, e.timestamp_ms, dl) for dl in deadletters.of_rejected(e.envelope)
                )
        letters.extend((off, stamp.get(off), dl) for off, dl in found)
        if not letters:
            return []
        return deadletters.link_rows(
            self.topic, link.partition, letters, self.dead_letter_max_bytes
        )

    def _link_columns(
        self, link: Link
    ) -> tuple[KeptEvents, Threshold, Callable[[ColumnarResult], None]]:
        """Dedupe and ledger columns of one link (columnar, no object per event): its kept
        events and meter threshold (the input of its minute windows), and the function that
        completes the link with its windows (``aggregate_links``' result for it)."""
        topic = self.topic
        p = link.partition
        envs = [
            (e.offset, e.envelope)
            for e in sorted(link.entries, key=lambda e: e.offset)
            if e.envelope is not None
        ]
        # 1. dedupe: first copy by (offset, index) wins, within the link and against the index.
        # Columns of the whole link in (offset, index) order; ``first`` maps each key to the
        # position of its first copy (built from the reversed columns, so the earliest wins).
        chain = itertools.chain.from_iterable
        env_tenants = [env.tenant_id for _o, env in envs]
        counts = [len(env) for _o, env in envs]  # events per envelope
        tenants = _spread(env_tenants, counts)
        ids = list(chain(env.ids for _o, env in envs))
        keys = list(zip(tenants, ids, strict=True))
        events_in = len(keys)
        first = dict(zip(reversed(keys), range(events_in - 1, -1, -1), strict=True))
        seen = self.index_for(p).contains_many(first.keys()) if first else set()
        duplicates = events_in - len(first) + len(seen)

        # 2. the link's events as columns, every copy, and which of them are kept: the ledger
        # batch holds the kept rows (picked natively, by a mask over the Arrow columns), and
        # matching and aggregation read the columns at the kept positions (``KeptEvents``): no
        # column is copied in Python for the copies dropped
        types = list(chain(env.types for _o, env in envs))
        customers = list(chain(env.customers for _o, env in envs))
        times = list(chain(env.times_ms for _o, env in envs))
        props = list(chain(env.properties for _o, env in envs))
        # an event's index in its envelope (``positions`` when bad rows were left out of it)
        index_in_env = list(
            chain(range(len(env)) if env.positions is None else env.positions for _o, env in envs)
        )
        # each event's envelope (numbered in ``envs``): what is the same for every event of an
        # envelope (tenant, acceptance time, offset) follows it
        env_of = np.repeat(np.arange(len(envs), dtype=np.int32), counts)
        all_offsets = np.array([o for o, _env in envs], dtype=np.int64)[env_of]
        env_accepted_ms = [env.ingested_at_ms for _o, env in envs]
        all_accepted_ms = np.array(env_accepted_ms, dtype=np.int64)[env_of]
        is_kept: np.ndarray | None = None  # None: every event is kept
        if len(first) - len(seen) < events_in:  # something to drop: keep the first copies only
            for k in seen:
                del first[k]
            is_kept = np.zeros(events_in, dtype=np.bool_)
            is_kept[np.fromiter(first.values(), dtype=np.int64, count=len(first))] = True
        # the ledger's properties as JSON: the envelopes' property lines (version 2) as they
        # are; else written here for the kept events, and an event whose properties cannot be
        # written (nested deeper than the encoder allows) is not kept: it goes to the dead
        # letters
        found: list[tuple[int, DeadLetter]] = []  # dead letters met on the way
        lines: list[bytes]
        if all(env.property_texts is not None for _o, env in envs):
            lines = list(chain(env.property_texts or () for _o, env in envs))
        else:
            kept_at = range(events_in) if is_kept is None else np.flatnonzero(is_kept).tolist()
            texts, unencodable = _json_texts_checked([props[j] for j in kept_at])
            lines = [b""] * events_in
            for j, text in zip(kept_at, texts, strict=True):
                lines[j] = text
            if unencodable and is_kept is None:
                is_kept = np.ones(events_in, dtype=np.bool_)
            for g, exc in unencodable:
                j = kept_at[g]
                ev = EnvelopeEvent(ids[j], types[j], customers[j], times[j], props[j])
                origin = _Origin(tenants[j], int(all_accepted_ms[j]))
                letter = deadletters.of_unencodable(origin, index_in_env[j], ev, exc)
                found.append((int(all_offsets[j]), letter))
                assert is_kept is not None
                is_kept[j] = False
        positions: list[int] | None = None
        kept_keys = keys
        mask: pa.Array | None = None
        kept_env_of, kept_offsets, kept_accepted_ms = env_of, all_offsets, all_accepted_ms
        if is_kept is not None:
            positions = np.flatnonzero(is_kept).tolist()
            kept_keys = [keys[j] for j in positions]
            mask = pa.array(is_kept)
            kept_env_of = env_of[is_kept]
            kept_offsets = all_offsets[is_kept]
            kept_accepted_ms = all_accepted_ms[is_kept]

        def kept_rows(column: pa.Array) -> pa.Array:
            return column if mask is None else column.filter(mask)

        offsets = all_offsets.tolist()
        kept = KeptEvents(tenants, ids, types, customers, times, props, offsets, positions)
        n_kept = len(kept_env_of)
        times_ms = kept_rows(pa.array(times, pa.int64()))
        # late: more than ``late_ms`` before its envelope's acceptance
        late = int(np.count_nonzero(times_ms.to_numpy() < kept_accepted_ms - self.late_ms))
        schema = EVENTS_SCHEMA
        link.events = pa.Table.from_arrays(
            [
                pa.array(env_tenants, pa.string()).take(pa.array(kept_env_of)),
                kept_rows(pa.array(ids, pa.string())),
                kept_rows(pa.array(types, pa.string())),
                kept_rows(pa.array(customers, pa.string())),
                times_ms.view(schema.field("time").type),
                # valid UTF-8 already (decoded or written by orjson): no second check
                kept_rows(pa.array(lines, pa.binary())).view(pa.string()),
                pa.array(kept_accepted_ms).view(schema.field("ingested_at").type),
                pa.array([topic], pa.string()).take(pa.array(np.zeros(n_kept, dtype=np.int32))),
                pa.array(np.full(n_kept, p, dtype=np.int32)),
                pa.array(kept_offsets),
                kept_rows(pa.array(index_in_env, pa.uint32())),
            ],
            schema=schema,
        )
        acts = self.activations

        def threshold(cm: CompiledMeter) -> int | None:
            if acts.always(cm.id, cm.activation_topic):
                return -1
            if cm.activation_topic != topic:
                return None
            marker = acts.first_markers(p).get(cm.id, NO_MARKER)
            return None if marker >= NO_MARKER else marker

        def finish(result: ColumnarResult) -> None:
            link.usage = result.usage
            link.kept_keys = kept_keys
            link.kept_ingested_ms = kept_accepted_ms.tolist()
            link.events_in = events_in
            link.duplicates = duplicates
            link.value_errors = result.value_errors
            for j, meter_id, message in result.issues:  # j: a position in the link's columns
                log.debug("event %s/%s: meter %s: %s", tenants[j], ids[j], meter_id, message)
                ev = EnvelopeEvent(ids[j], types[j], customers[j], times[j], props[j])
                origin = _Origin(tenants[j], int(all_accepted_ms[j]))
                letter = deadletters.of_meter_value(origin, index_in_env[j], ev, meter_id, message)
                found.append((offsets[j], letter))
            link.dead_letter_rows = self._dead_letter_rows(link, found)
            link.late = late
            link.prepared = True

        return kept, threshold, finish

    def _activate(
        self, markers: list[tuple[int, int, Control]]
    ) -> list[tuple[str, str, str, int, int]]:
        """Bring the activation state of the assigned partitions up to date (store read after an
        assignment) and apply the batch's markers in offset order; the activation rows to write."""
        acts = self.activations
        for p, upto in acts.to_load().items():
            acts.load(p, self.sink.activations(self.topic, p, upto) if upto >= 0 else {})
        rows: list[tuple[str, str, str, int, int]] = []
        for p, offset, control in markers:
            meter = control.meter
            if meter.activation_topic != self.topic:
                log.warning(
                    "activation marker of meter %s for topic %r found in %s[%d]@%d: ignored",
                    meter.id,
                    meter.activation_topic,
                    self.topic,
                    p,
                    offset,
                )
                continue
            if acts.mark(p, meter.id, offset):
                rows.append((meter.tenant_id, meter.id, self.topic, p, offset))
        if rows:
            self.metrics.markers.inc(len(rows))
        return rows

    # --- one attempt at the store (executor thread) ---------------------------------------
    def _judge(self, link: Link, m: int, claim: Claim | None) -> Verdict | None:
        """The verdict the store's state gives a link, or None: nothing covers it yet."""
        if self.owner and claim is not None and claim.owner != self.owner:
            return Verdict.FENCED
        if m == link.last:
            return Verdict.STORED
        if m >= link.first:
            return Verdict.RESYNC
        return None

    def _reading(self, links: list[Link]) -> ChainState | None:
        """The store's state for step (0) without a read, when every link is a first attempt
        that starts right after a link this worker's own read verified stored at most
        ``reuse_read_s`` ago (the chain end it showed, M = first - 1, and no other owner's
        claim then); None: read. Skipping the read keeps the commit exact: the chain token
        is the safety (a link from F lands once, whoever sends it) and step (3) still reads;
        a newer claim of another owner is then seen one insert later."""
        if self.reuse_read_s <= 0:
            return None
        now = self.monotonic()
        progress: dict[int, int] = {}
        marks: list[int] = []
        for k in links:
            seen = self._verified.get(k.partition)
            if (
                k.attempts
                or seen is None
                or seen.generation != k.generation
                or seen.chain_end != k.first - 1
                or now - seen.read_at > self.reuse_read_s
            ):
                return None
            progress[k.partition] = seen.chain_end
            marks.append(seen.mark)
        # the smallest mark: what landed after it covers what landed after each of the reads
        return ChainState(progress, {}, min(marks, default=0))

    def flush_batch(self, links: list[Link]) -> Outcome:
        """One attempt to commit ``links`` (prepared) and find out what the store holds.

        Never raises for store errors: they are reported in ``Outcome.error`` with the links
        left UNKNOWN (retry them unchanged).
        """
        out = Outcome()
        if not links:
            return out
        started = time.perf_counter()
        parts = [k.partition for k in links]
        verdicts = out.verdicts
        reused = self._reading(links)
        for p in parts:  # a reading serves one attempt: only a new verified one, the next
            self._verified.pop(p, None)
        # (0) what does the store hold already? (claims: is this worker still the owner?)
        try:
            if reused is not None:
                before = reused
                out.read_reused = True
            else:
                before = self.sink.read_chain(self.topic, parts)
        except Exception as exc:
            out.error = exc
            self.metrics.store_errors.inc()
            for k in links:
                verdicts[k.partition] = (Verdict.UNKNOWN, -1)
            return out
        now = self.monotonic()
        todo: list[Link] = []
        for k in links:
            m = before.progress.get(k.partition, -1)
            v = self._judge(k, m, before.claims.get(k.partition))
            if v is not None:
                verdicts[k.partition] = (v, m)
            elif k.first_attempt is not None and now - k.first_attempt > self.link_max_age_s:
                # too old to send again: start over from what the store holds now (a fresh read)
                log.warning(
                    "link %s..%d sealed %.0f s ago is abandoned; redoing from store progress %d",
                    k.token,
                    k.last,
                    now - k.first_attempt,
                    m,
                )
                verdicts[k.partition] = (Verdict.RESYNC, m)
            elif m < k.first - 1:
                log.error(
                    "store progress of %s[%d] is %d, behind the chain end %d this worker "
                    "verified: not committing until it is consistent",
                    self.topic,
                    k.partition,
                    m,
                    k.first - 1,
                )
                verdicts[k.partition] = (Verdict.UNKNOWN, m)
            else:
                todo.append(k)

        if todo:
            try:
                # (a) the ledger rows of every link (idempotent: replays collapse), but for a
                # first attempt whose rows landed while it was prepared
                unsent = [k.events for k in todo if k.attempts or not k.ledger_ahead]
                events = pa.concat_tables(unsent) if unsent else _EMPTY_EVENTS
                if events.num_rows:
                    self.sink.insert_events(events)
                rows_written = self.metrics.flush_rows
                rows_written.labels("events").inc(events.num_rows)
                # (b) meter activation rows (idempotent, like the events rows)
                activation_rows = [r for k in todo for r in k.activation_rows]
                if activation_rows:
                    self.sink.record_activations(activation_rows)
                    rows_written.labels("meter_activations").inc(len(activation_rows))
                # (b) dead letters (idempotent: deterministic rows keyed by source position)
                dead_letter_rows = [r for k in todo for r in k.dead_letter_rows]
                if dead_letter_rows:
                    self.sink.record_dead_letters(dead_letter_rows)
                    rows_written.labels("dead_letters").inc(len(dead_letter_rows))
                # (c) the commit points: one token-deduplicated insert per link
                for k in todo:
                    k.attempts += 1
                    if k.first_attempt is None:
                        k.first_attempt = self.monotonic()
                    out.inserts += 1
                    sent = self.sink.commit_link(self.topic, k.partition, k.first, k.last, k.usage)
                    rows_written.labels("usage_minute").inc(sent)
            except Exception as exc:
                out.error = exc
            # (d) whose link landed? (a failed read is never "not landed": it is unknown) Only
            # what landed after the reading of step (0) is read again (``since``).
            read_at = self.monotonic()
            try:
                after = self.sink.read_chain(self.topic, [k.partition for k in todo], before)
            except Exception as exc:
                out.error = out.error or exc
                for k in todo:
                    verdicts[k.partition] = (Verdict.UNKNOWN, -1)
            else:
                for k in todo:
                    m = after.progress.get(k.partition, -1)
                    v = self._judge(k, m, after.claims.get(k.partition))
                    verdicts[k.partition] = (v or Verdict.UNKNOWN, m)
                    if v is Verdict.STORED and out.error is None:
                        self._verified[k.partition] = _Verified(
                            k.generation, read_at, m, after.mark
                        )

        self._announce(links, verdicts)
        # 4. the index follows the store: kept ids of stored links, rebuilds of resynced ones
        for k in links:
            v, m = verdicts[k.partition]
            try:
                if v is Verdict.STORED:
                    self.index_for(k.partition).record_keys(k.kept_keys, k.kept_ingested_ms, k.last)
                elif v is Verdict.RESYNC:
                    rebuild(
                        self.index_for(k.partition),
                        self.sink,
                        self.topic,
                        k.partition,
                        m,
                        self.clock_ms(),
                        self.horizon_ms,
                    )
            except Exception as exc:
                log.warning("dedupe index of %s[%d] not updated: %r", self.topic, k.partition, exc)
                out.error = out.error or exc
                verdicts[k.partition] = (Verdict.UNKNOWN, m)
        if out.error is not None:
            self.metrics.store_errors.inc()
        self.metrics.flush_seconds.observe(time.perf_counter() - started)
        return out

    def _announce(self, links: list[Link], verdicts: dict[int, tuple[Verdict, int]]) -> None:
        """Tell ``on_stored`` what the reads showed stored: a stored link's partition up to its
        last offset, a resynced one up to the store's chain end ``M``. A fact of the store, whatever the worker does next: a partition
        revoked meanwhile still has those offsets stored (a superset of what ``apply`` reports
        as progress). A failing callback is logged."""
        on_stored = self.on_stored
        if on_stored is None:
            return
        for k in links:
            v, m = verdicts.get(k.partition, (Verdict.UNKNOWN, -1))
            if v is Verdict.STORED or v is Verdict.RESYNC:
                try:
                    on_stored(k.partition, m)
                except Exception as exc:
                    log.warning("announcing %s[%d] stored failed: %r", self.topic, k.partition, exc)

    # --- results (caller's thread) --------------------------------------------------------
    def apply(self, out: Outcome, links: list[Link]) -> Applied:
        """Move chain ends and buffers by the verdicts; return the entries to ack."""
        res = Applied()
        for k in links:
            p = k.partition
            if self._gen.get(p) != k.generation or self._sealed.get(p) is not k:
                continue  # revoked (or reassigned) meanwhile: not ours to settle
            v, m = out.verdicts.get(p, (Verdict.UNKNOWN, -1))
            if v is Verdict.UNKNOWN:
                res.unresolved.append(p)
                continue
            if v is Verdict.FENCED:
                self.revoke(p)
                res.fenced.append(p)
                continue
            del self._sealed[p]
            if v is Verdict.STORED:
                self._chain[p] = k.last
                res.acks.extend(k.entries)
                res.stored[p] = k.last
                wm = self.metrics
                wm.stored.inc(k.events.num_rows)
                wm.duplicate.inc(k.duplicates)
                if k.late:
                    wm.late.inc(k.late)
                if k.value_errors:
                    wm.meter_value_errors.inc(k.value_errors)
                for r in k.dead_letter_rows:
                    wm.dead_letters.labels(r[2]).inc()
                continue
            # RESYNC: the store's chain ends at m; offsets <= m are stored (by someone)
            self._chain[p] = m
            self.activations.assign(p, m)  # markers in the other link: reload from the store
            self._high[p] = max(self._high[p], m)
            rest = k.entries + self._drop_buffer(p)
            res.acks.extend(e for e in rest if e.offset <= m)
            keep = [e for e in rest if e.offset > m]
            if keep:
                self._buffer[p] = keep
                self._buffered_events += self._events_of(keep)
            res.resynced[p] = m
            log.warning(
                "%s[%d]: the store's chain ends at %d, not at %d (link %s): resynced, %d "
                "messages to commit again",
                self.topic,
                p,
                m,
                k.last,
                k.token,
                len(keep),
            )
        return res

    # --- synchronous use (tests, tools) ---------------------------------------------------
    def flush(self) -> dict[int, int]:
        """Commit everything held, link by link, until done; raise if a link stays unresolved
        (it stays sealed: call again to retry it). Returns the new chain ends."""
        done: dict[int, int] = {}
        while True:
            self.seal()
            links = self.links()
            if not links:
                return done
            self.prepare(links)
            out = self.flush_batch(links)
            applied = self.apply(out, links)
            done.update(applied.progress)
            if applied.unresolved:
                if out.error is not None:
                    raise out.error
                raise LinkUnresolved(f"links of partitions {applied.unresolved} are unresolved")
