"""One flush of the worker: dedupe -> events rows -> minute aggregates -> sink.commit -> index.

Pure apart from the dedupe index and the sink it is given (no Kafka here). See
docs/architecture.md, "The worker's commit order", for why this order is exactly-once:

1. dedupe each event against the events kept earlier in the batch and the partition's index;
   the first copy by (offset, index in envelope) wins;
2-3. ``sink.commit``: the events rows, then usage deltas + one progress row per partition in one
   insert (the commit point). Progress covers every offset of the batch, also poison messages and
   envelopes whose events were all duplicates;
4. the kept ids go into the index with the partition's new watermark;
5. the caller acks the returned offsets.

A failed commit leaves the batch intact: the caller retries the same batch (never drops it).

Control messages (``schemas.control``) travel in the same partitions: an ``activate_meter`` marker
starts its meter in its partition (``streams.activation``); the flush that holds a meter's first
marker in a partition writes its activation row just before ``sink.commit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import Counter, Histogram

from schemas.control import Control, ControlError, decode_control, is_control
from schemas.envelope import Envelope, EnvelopeError, decode
from schemas.meters import Meter
from schemas.timeutil import from_epoch_ms
from streams.activation import Activations
from streams.aggregation import WindowTable
from streams.dedupe import DedupeIndex, rebuild
from streams.matching import MeterIndex, ValueProblem
from streams.sink import Sink

log = logging.getLogger(__name__)

EVENTS_IN = Counter("tally_worker_events_in", "Events read from the topic and flushed")
DUPLICATES = Counter("tally_worker_duplicates", "Events dropped as duplicates of a stored id")
EVENTS_STORED = Counter("tally_worker_events_stored", "Events stored in the ledger")
POISON = Counter("tally_worker_poison_messages", "Undecodable messages skipped")
METER_VALUE_ERRORS = Counter(
    "tally_worker_meter_value_errors", "Events that matched a meter but had an unusable value"
)
FLUSH_SECONDS = Histogram(
    "tally_worker_flush_seconds",
    "Time of one flush (dedupe, aggregate, store commit, index)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
SKIPPED = Counter("tally_worker_skipped_messages", "Messages skipped as already stored")
MARKERS = Counter(
    "tally_worker_activation_markers", "Meter activation markers processed (first in a partition)"
)

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


@dataclass(slots=True)
class Entry:
    partition: int
    offset: int
    envelope: Envelope | None  # None: poison or control message
    control: Control | None = None  # an activation marker (streams.activation)


@dataclass
class Batch:
    """Messages buffered for one flush, in arrival order (offset order per partition)."""

    entries: list[Entry] = field(default_factory=list)
    events: int = 0
    last_offsets: dict[int, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, entry: Entry) -> None:
        self.entries.append(entry)
        if entry.envelope is not None:
            self.events += len(entry.envelope.events)
        self.last_offsets[entry.partition] = max(
            entry.offset, self.last_offsets.get(entry.partition, -1)
        )

    def extend(self, other: Batch) -> None:
        for e in other.entries:
            self.append(e)

    def without_partitions(self, partitions: set[int]) -> Batch:
        out = Batch()
        for e in self.entries:
            if e.partition not in partitions:
                out.append(e)
        return out


@dataclass
class FlushResult:
    progress: dict[int, int]
    events_in: int
    duplicates: int
    stored: int
    usage_rows: int


class BatchProcessor:
    """Per-partition buffers of decoded envelopes and the flush of them.

    ``assign(p, M)`` must be called (with the store's progress) before messages of partition
    ``p`` are added; messages with offset <= the partition's high mark are skipped.
    Not thread-safe by itself: the worker adds on its event loop and flushes a ``take()``-n batch
    in one executor thread, never two flushes at once.
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
    ) -> None:
        self.horizon_ms = horizon_ms
        self.topic = topic
        self.sink = sink
        self.index_for = index_for
        self.meters = meters if meters is not None else MeterCache(sink.all_meters, clock_ms)
        self.clock_ms = clock_ms
        self._high: dict[int, int] = {}
        self.current = Batch()
        self.activations = Activations(topic)

    # --- assignment -----------------------------------------------------------------------
    def assign(self, partition: int, store_progress: int) -> None:
        self._high[partition] = store_progress
        self.activations.assign(partition, store_progress)  # loaded by the next flush

    def revoke(self, partition: int) -> None:
        """Forget a partition: its unflushed messages are dropped (not acked)."""
        self._high.pop(partition, None)
        self.activations.revoke(partition)
        if partition in self.current.last_offsets:
            self.current = self.current.without_partitions({partition})

    def assigned(self, partition: int) -> bool:
        return partition in self._high

    # --- buffering ------------------------------------------------------------------------
    def add(self, partition: int, offset: int, payload: bytes | None) -> bool:
        """Buffer one message. False if it is already stored/buffered (skip it, ack it)."""
        high = self._high.get(partition)
        if high is None:
            raise ValueError(f"partition {partition} of {self.topic} is not assigned")
        if offset <= high:
            SKIPPED.inc()
            return False
        self._high[partition] = offset
        control: Control | None = None
        env: Envelope | None = None
        try:
            if payload is None:
                raise EnvelopeError("empty message")
            if is_control(payload):
                control = decode_control(payload)
            else:
                env = decode(payload)
        except (EnvelopeError, ControlError) as exc:
            POISON.inc()
            log.warning("poison message %s[%d]@%d skipped: %s", self.topic, partition, offset, exc)
        self.current.append(Entry(partition, offset, env, control))
        return True

    @property
    def buffered_events(self) -> int:
        return self.current.events

    @property
    def buffered_messages(self) -> int:
        return len(self.current)

    def take(self) -> Batch:
        batch, self.current = self.current, Batch()
        return batch

    def flush(self) -> dict[int, int]:
        """Flush everything buffered. On failure the batch stays buffered (nothing lost)."""
        batch = self.take()
        try:
            return self.flush_batch(batch).progress
        except Exception:
            if self.landed(batch):
                return dict(batch.last_offsets)
            batch.extend(self.current)
            self.current = batch
            raise

    def landed(self, batch: Batch) -> bool:
        """After a commit raised: did it land anyway? (the usage + progress insert is atomic)

        If the store's progress covers every partition of the batch, the batch is done: the
        dedupe indexes are rebuilt from the store and the caller must NOT insert it again.
        """
        progress = self.sink.progress(self.topic)
        if not batch.last_offsets or not all(
            progress.get(p, -1) >= off for p, off in batch.last_offsets.items()
        ):
            return False
        now = self.clock_ms()
        for p in batch.last_offsets:
            rebuild(self.index_for(p), self.sink, self.topic, p, progress[p], now, self.horizon_ms)
            if p in self._high:
                self._high[p] = max(self._high[p], progress[p])
        log.warning("a failed flush had landed in the store; not inserting it again")
        return True

    # --- the flush ------------------------------------------------------------------------
    def flush_batch(self, batch: Batch) -> FlushResult:
        if not batch.entries:
            return FlushResult({}, 0, 0, 0, 0)
        started = time.perf_counter()
        topic = self.topic
        markers = sorted(
            (e.partition, e.offset, e.control) for e in batch.entries if e.control is not None
        )
        meter_index = self.meters.ensure([c.meter for _p, _o, c in markers])
        activation_rows = self._activate(markers)
        acts = self.activations

        # 1. dedupe: first copy by (offset, index) wins, within the batch and against the index
        by_partition: dict[int, list[Entry]] = {}
        for e in batch.entries:
            by_partition.setdefault(e.partition, []).append(e)
        kept: list[tuple[int, Envelope, int, int, Any]] = []  # (partition, envelope, offset, i, ev)
        kept_keys: dict[int, list[tuple[str, str, int]]] = {}
        events_in = 0
        duplicates = 0
        for p, entries in by_partition.items():
            entries.sort(key=lambda e: e.offset)
            first: dict[tuple[str, str], tuple[int, Envelope, int, int, Any]] = {}
            for e in entries:
                env = e.envelope
                if env is None:
                    continue
                tenant = env.tenant_id
                for i, ev in enumerate(env.events):
                    events_in += 1
                    k = (tenant, ev.id)
                    if k in first:
                        duplicates += 1
                    else:
                        first[k] = (p, env, e.offset, i, ev)
            seen = self.index_for(p).contains_many(first.keys()) if first else set()
            duplicates += len(seen)
            keys_p: list[tuple[str, str, int]] = []
            for k, item in first.items():
                if k in seen:
                    continue
                kept.append(item)
                keys_p.append((k[0], k[1], item[1].ingested_at_ms))
            kept_keys[p] = keys_p

        # 2. rows: ledger + minute windows
        events_rows: list[tuple[Any, ...]] = []
        windows = WindowTable()
        value_errors = 0
        dumps = orjson.dumps
        ingested_dt: dict[int, Any] = {}
        for p, env, offset, i, ev in kept:
            p_ing = env.ingested_at_ms
            ing = ingested_dt.get(p_ing)
            if ing is None:
                ing = ingested_dt[p_ing] = from_epoch_ms(p_ing)
            events_rows.append(
                (
                    env.tenant_id,
                    ev.id,
                    ev.type,
                    ev.customer,
                    from_epoch_ms(ev.time_ms),
                    dumps(ev.properties).decode(),
                    ing,
                    topic,
                    p,
                    offset,
                    i,
                )
            )
            for cm in meter_index.candidates(env.tenant_id, ev.type):
                if not acts.applies(cm.id, cm.activation_topic, p, offset):
                    continue
                try:
                    c = cm.match(ev)
                except ValueProblem as exc:
                    value_errors += 1
                    log.debug("event %s/%s: meter %s: %s", env.tenant_id, ev.id, cm.id, exc)
                    continue
                if c is not None:
                    windows.add(env.tenant_id, ev.customer, ev.time_ms, ev.id, c)
        usage_rows = windows.rows()
        progress = dict(batch.last_offsets)

        # 3. the commit point (activation rows first: idempotent, like the events rows)
        if activation_rows:
            self.sink.record_activations(activation_rows)
        self.sink.commit(topic, events_rows, usage_rows, progress)

        # 4. record the kept ids (an id is "seen" only now, after the commit)
        for p, last in progress.items():
            self.index_for(p).add_many(kept_keys.get(p, ()), last)
            if p in self._high and self._high[p] < last:
                self._high[p] = last

        EVENTS_IN.inc(events_in)
        DUPLICATES.inc(duplicates)
        EVENTS_STORED.inc(len(events_rows))
        if value_errors:
            METER_VALUE_ERRORS.inc(value_errors)
        FLUSH_SECONDS.observe(time.perf_counter() - started)
        return FlushResult(progress, events_in, duplicates, len(events_rows), len(usage_rows))

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
            MARKERS.inc(len(rows))
        return rows
