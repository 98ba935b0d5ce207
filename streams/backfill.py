"""Apply a meter to history: the events on the backfill side of its activation boundary.

The stream counts a meter X from its activation markers on (``streams.activation``). A backfill
run counts exactly the complement, from the ledger (``events``), with the same matching and
aggregation code as the worker:

(a) **boundary**: for X's activation topic T and each partition p, the offset A_p of X's first
    marker there (the activation rows the worker wrote). If T is the live topic the run first
    waits until the worker has *passed* every marker (an activation row for every partition and
    the partition's committed progress >= A_p), so every event before a marker is in the ledger.
    If T is an older topic (an earlier embedded generation), partitions without an activation row
    contribute all their events. ``Boundary.includes`` is the predicate; it is fixed once and
    stored with the run, so a resumed run scans exactly the same events.
(b) **scan** the tenant's events of X's event type with ``order(source_topic) < order(T)``, or
    ``source_topic == T and source_offset < A_source_partition``, in event id order (keyset).
(c) **write** the usage rows under ``origin = 'b:<run>'`` in chunks; each chunk is one insert that
    also carries the chunk's checkpoint (keyset position and counters), sent with the
    deduplication token (run, chunk): a chunk re-sent after a crash or a lost answer is stored once.
(d) **swap**: one ``backfill_runs`` row marks the run complete. Usage queries read the stream rows
    plus only the meter's latest complete run, so they never see a half-written run and keep
    showing the previous one until then.
(e) **garbage-collect** the rows of the runs this one replaced (correctness never depends on it).

Event corrections: when the boundary is fixed the run also reads the tenant's newest correction
seq S and stores it (``corrections_seq``); its scan applies exactly the corrections with
``1 <= seq <= S`` (a voided event is scanned but not counted, an amended one is counted with its
corrected properties). Corrections with a higher seq reach the run through their effect rows
(side 'b'), which usage queries add only above the visible run's S: every correction counts
once, whenever the run scanned the event.

Runs are exclusive per meter, across processes: a lock row per acquisition, inserted with a
deduplication token derived from (tenant, meter, sequence number); the store keeps one, and whoever
reads back its own owner id holds the lock. The holder heartbeats; a second invocation while the
heartbeat is fresh gets ``Conflict`` (409) naming the running run. When the heartbeat is older
than the lease (the holder crashed), the next invocation takes the lock over and RESUMES the same
run from its last checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from schemas.backfill import (
    COMPLETE,
    FAILED,
    NOTHING_TO_DO,
    RUNNING,
    Boundary,
    Checkpoint,
    LockRow,
    RunRecord,
    origin_of,
)
from schemas.envelope import EnvelopeEvent
from schemas.meters import Meter, MeterStatus
from schemas.topics import topic_order
from streams.aggregation import WindowTable
from streams.matching import CompiledMeter, ValueProblem
from tally.errors import Conflict, TallyError, Unavailable, ValidationError

log = logging.getLogger(__name__)

ORIGIN_COLUMN = 5  # position of `origin` in a usage row


def make_boundary(meter_topic: str, ledger_topics: list[str], bounds: dict[int, int]) -> Boundary:
    order = topic_order(meter_topic)
    older = tuple(sorted({t for t in ledger_topics if topic_order(t) < order}))
    return Boundary(meter_topic, older, dict(bounds))


def pending_partitions(
    partitions: int, first_markers: dict[int, int], progress: dict[int, int]
) -> list[int]:
    """Partitions of the live topic whose marker the worker has not passed yet."""
    return [
        p
        for p in range(partitions)
        if p not in first_markers or progress.get(p, -1) < first_markers[p]
    ]


def decide_lock(
    head: LockRow | None, run: RunRecord | None, now_ms: int, lease_ms: int
) -> tuple[str, str | None]:
    """What an invocation may do, given the newest lock row and its run:

    - ``("new", None)``: no run holds the meter; start a new run;
    - ``("resume", run_id)``: the run is unfinished and its holder's lease expired;
    - ``("held", run_id)``: the run is unfinished and its holder is alive (409).
    """
    if head is None:
        return "new", None
    if run is not None and run.state in (COMPLETE, FAILED):
        return "new", None
    alive_ms = max(head.acquired_ms, run.heartbeat_ms if run is not None else 0)
    if run is not None and run.heartbeat_ms == 0 and run.version > 0:
        alive_ms = 0  # released by its holder after an error: resumable at once
    if now_ms - alive_ms < lease_ms:
        return "held", head.run_id
    return "resume", head.run_id


# --- the store it needs (clickhouse.backfill.BackfillStore) ----------------------------------


class Store(Protocol):
    def ledger_topics(self, tenant_id: str, event_type: str) -> list[str]: ...

    def activation_offsets(self, tenant_id: str, meter_id: str, topic: str) -> dict[int, int]: ...

    def progress(self, topic: str) -> dict[int, int]: ...

    def count_events(self, tenant_id: str, event_type: str, boundary: Boundary) -> int: ...

    def scan_events(
        self,
        tenant_id: str,
        event_type: str,
        boundary: Boundary,
        after: str,
        limit: int,
        corrections_seq: int = 0,
    ) -> list[tuple[str, str, int, dict[str, Any] | None]]: ...

    def corrections_top(self, tenant_id: str) -> int: ...

    def write_chunk(
        self, tenant_id: str, meter_id: str, run_id: str, rows: list[tuple], cp: Checkpoint
    ) -> None: ...

    def checkpoints(self, tenant_id: str, meter_id: str, run_id: str) -> list[Checkpoint]: ...

    def count_windows(self, tenant_id: str, meter_id: str, run_id: str) -> int: ...

    def lock_head(self, tenant_id: str, meter_id: str) -> LockRow | None: ...

    def insert_lock(self, row: LockRow) -> None: ...

    def lock_at(self, tenant_id: str, meter_id: str, seq: int) -> LockRow | None: ...

    def get_run(self, tenant_id: str, meter_id: str, run_id: str) -> RunRecord | None: ...

    def save_run(self, record: RunRecord) -> None: ...

    def retire_runs(self, tenant_id: str, meter_id: str, keep_run_id: str) -> None: ...


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveTopic:
    """The topic the API produces to now, and its partition count."""

    topic: str
    partitions: int


@dataclass(frozen=True)
class Progress:
    """What a run reports while it works: ``phase`` is ``waiting`` (for the worker to pass the
    markers: ``done``/``total`` partitions) or ``scanning`` (events)."""

    phase: str
    done: int
    total: int
    run_id: str = ""
    resumed: bool = False


@dataclass(frozen=True)
class BackfillResult:
    run_id: str
    state: str
    resumed: bool
    events_total: int
    events_scanned: int
    events_matched: int
    value_problems: int
    windows: int
    chunks: int


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class BackfillRunner:
    """One invocation of ``tally meters backfill`` / ``POST .../backfill`` for one meter."""

    def __init__(
        self,
        store: Store,
        meter: Meter,
        *,
        live: LiveTopic | None,
        chunk_events: int = 50_000,
        lease_s: float = 60.0,
        wait_s: float = 60.0,
        poll_s: float = 0.2,
        on_progress: Callable[[Progress], None] | None = None,
        on_chunk: Callable[[int], None] | None = None,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        if chunk_events < 1:
            raise ValidationError(
                "chunk_events must be >= 1",
                details=[{"field": "chunk_events", "message": "at least 1"}],
            )
        self.store = store
        self.meter = meter
        self.live = live
        self.chunk_events = chunk_events
        self.lease_ms = int(lease_s * 1000)
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.on_progress = on_progress
        self.on_chunk = on_chunk  # called after each stored chunk (tests inject crashes here)
        self.clock_ms = clock_ms
        self.owner = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._record: RunRecord | None = None
        self._lock_row: LockRow | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._resumed = False

    # --- public -----------------------------------------------------------------------------
    def run(self) -> BackfillResult:
        meter = self.meter
        if not meter.activation_topic:
            # Stored without activation markers: the stream applies it to every event.
            return BackfillResult("", NOTHING_TO_DO, False, 0, 0, 0, 0, 0, 0)
        if (
            meter.status == MeterStatus.PENDING
            and self.live is not None
            and meter.activation_topic == self.live.topic
        ):
            raise Conflict(
                f"meter '{meter.slug}' is not active yet: its activation did not finish. Send the "
                "same create request (POST /v1/meters) again to finish it, then backfill",
                details=[{"field": "slug", "message": "meter activation pending"}],
            )
        run_id, resumed = self._acquire()
        beat = threading.Thread(target=self._heartbeat, name="tally-backfill-hb", daemon=True)
        try:
            beat.start()
            return self._run(run_id, resumed)
        except Exception as exc:
            self._release(exc)
            raise
        finally:
            self._stop.set()
            beat.join(timeout=5)

    # --- lock -------------------------------------------------------------------------------
    def _acquire(self) -> tuple[str, bool]:
        t, m = self.meter.tenant_id, self.meter.id
        head = self.store.lock_head(t, m)
        run = self.store.get_run(t, m, head.run_id) if head is not None else None
        now = self.clock_ms()
        decision, run_id = decide_lock(head, run, now, self.lease_ms)
        if decision == "held":
            assert head is not None
            raise self._held(run_id or head.run_id, run, now)
        resumed = self._resumed = decision == "resume"
        if not resumed:
            run_id = uuid.uuid4().hex[:12]
        assert run_id is not None
        row = LockRow(t, m, (head.seq if head else 0) + 1, run_id, self.owner, now)
        self.store.insert_lock(row)
        winner = self.store.lock_at(t, m, row.seq)
        if winner is None or winner.owner != self.owner:
            other = winner.run_id if winner is not None else "another run"
            raise self._held(other, None, now)
        self._lock_row = row
        base = run if (resumed and run is not None) else None
        self._record = replace(
            base or RunRecord(t, m, run_id, started_ms=now, chunk_events=self.chunk_events),
            state=RUNNING,
            owner=self.owner,
            heartbeat_ms=now,
            version=max(now, (base.version + 1) if base else 0),
        )
        self.store.save_run(self._record)
        log.info(
            "backfill of meter %s/%s: %s run %s",
            t,
            self.meter.slug,
            "resuming" if resumed else "starting",
            run_id,
        )
        return run_id, resumed

    def _held(self, run_id: str, run: RunRecord | None, now: int) -> Conflict:
        beat = ""
        if run is not None and run.heartbeat_ms:
            beat = f" (last heartbeat {max(0, now - run.heartbeat_ms) / 1000:.0f}s ago)"
        return Conflict(
            f"a backfill of meter '{self.meter.slug}' is already running: run {run_id}{beat}. "
            f"Wait for it to finish; if its process died, the next backfill resumes it once its "
            f"lease ({self.lease_ms / 1000:g}s without a heartbeat) has expired",
            details=[{"field": "run_id", "message": run_id}],
        )

    def _save(self, **changes: Any) -> RunRecord:
        with self._lock:
            assert self._record is not None
            now = self.clock_ms()
            rec = replace(
                self._record,
                **changes,
                version=max(now, self._record.version + 1),
            )
            self._record = rec
            self.store.save_run(rec)
            return rec

    def _check_owner(self) -> None:
        if self._lost is not None:
            raise Conflict(self._lost, details=[{"field": "run_id", "message": "lock lost"}])
        row = self._lock_row
        assert row is not None
        head = self.store.lock_head(row.tenant_id, row.meter_id)
        if head is None or head.owner != self.owner:
            self._lost = (
                f"backfill run {row.run_id} of meter '{self.meter.slug}' lost its lock "
                f"(another invocation took it over); stopping"
            )
            raise Conflict(self._lost, details=[{"field": "run_id", "message": "lock lost"}])

    def _heartbeat(self) -> None:
        interval = max(0.05, self.lease_ms / 4000)
        while not self._stop.wait(interval):
            try:
                self._check_owner()
                self._save(heartbeat_ms=self.clock_ms())
            except Conflict:
                return
            except Exception as exc:  # the store is down: the lease may expire, that is fine
                log.warning("backfill heartbeat failed: %r", exc)

    def _release(self, exc: BaseException) -> None:
        """After an error: a run without a boundary is marked failed (the next run starts
        afresh); otherwise the lease is given up at once so that the next invocation resumes."""
        if self._record is None or self._lost is not None:
            return
        try:
            if self._record.boundary is None:
                msg = exc.message if isinstance(exc, TallyError) else repr(exc)
                self._save(state=FAILED, error=msg[:2000], finished_ms=self.clock_ms())
            else:
                self._save(heartbeat_ms=0)
        except Exception:
            log.warning("could not release backfill run %s", self._record.run_id)

    # --- the work ---------------------------------------------------------------------------
    def _report(self, phase: str, done: int, total: int) -> None:
        if self.on_progress is not None:
            rec = self._record
            self.on_progress(Progress(phase, done, total, rec.run_id if rec else "", self._resumed))

    def _wait_boundary(self) -> Boundary:
        meter, store = self.meter, self.store
        topic = meter.activation_topic
        live = self.live if self.live is not None and self.live.topic == topic else None
        deadline = time.monotonic() + self.wait_s
        while True:
            bounds = store.activation_offsets(meter.tenant_id, meter.id, topic)
            if live is None:
                break
            missing = pending_partitions(live.partitions, bounds, store.progress(topic))
            if not missing:
                break
            self._report("waiting", live.partitions - len(missing), live.partitions)
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"backfill of meter '{meter.slug}': the stream worker has not passed the "
                    f"meter's activation marker on partition(s) {missing} of topic {topic} within "
                    f"{self.wait_s:g}s. Is the worker running? Retry once it has caught up",
                    details=[{"field": "partitions", "message": str(missing)}],
                )
            time.sleep(self.poll_s)
        topics = store.ledger_topics(meter.tenant_id, meter.event_type)
        return make_boundary(topic, topics, bounds)

    def _run(self, run_id: str, resumed: bool) -> BackfillResult:
        meter, store = self.meter, self.store
        t, m = meter.tenant_id, meter.id
        rec = self._record
        assert rec is not None
        if rec.boundary is None:
            fixed = self._wait_boundary()
            total = store.count_events(t, meter.event_type, fixed)
            rec = self._save(
                boundary=fixed,
                events_total=total,
                chunk_events=self.chunk_events,
                corrections_seq=store.corrections_top(t),
            )
        boundary = rec.boundary
        assert boundary is not None
        chunk_events = rec.chunk_events or self.chunk_events  # a resumed run keeps its chunking
        done = store.checkpoints(t, m, run_id)
        chunk = max((c.chunk for c in done), default=0)
        after = max(done, key=lambda c: c.chunk).last_event_id if done else ""
        scanned = sum(c.scanned for c in done)
        matched = sum(c.matched for c in done)
        problems = sum(c.problems for c in done)
        compiled = CompiledMeter(meter)
        origin = origin_of(run_id)
        self._report("scanning", scanned, rec.events_total)
        while True:
            events = store.scan_events(
                t, meter.event_type, boundary, after, chunk_events, rec.corrections_seq
            )
            if not events:
                break
            table = WindowTable()
            c_matched = c_problems = 0
            for event_id, customer, time_ms, properties in events:
                if properties is None:  # voided by a correction the run applies
                    continue
                ev = EnvelopeEvent(event_id, meter.event_type, customer, time_ms, properties)
                try:
                    c = compiled.match(ev)
                except ValueProblem:
                    c_problems += 1
                    continue
                if c is not None:
                    table.add(t, customer, time_ms, event_id, c)
                    c_matched += 1
            rows = [(*r[:ORIGIN_COLUMN], origin, *r[ORIGIN_COLUMN + 1 :]) for r in table.rows()]
            chunk += 1
            after = events[-1][0]
            cp = Checkpoint(chunk, after, len(events), c_matched, c_problems)
            self._check_owner()
            store.write_chunk(t, m, run_id, rows, cp)
            scanned += len(events)
            matched += c_matched
            problems += c_problems
            self._save(
                heartbeat_ms=self.clock_ms(),
                events_scanned=scanned,
                events_matched=matched,
                value_problems=problems,
                chunks=chunk,
            )
            self._report("scanning", scanned, max(rec.events_total, scanned))
            if self.on_chunk is not None:
                self.on_chunk(chunk)
            if len(events) < chunk_events:
                break
        windows = store.count_windows(t, m, run_id)
        self._check_owner()
        now = self.clock_ms()
        self._save(
            state=COMPLETE,
            heartbeat_ms=now,
            finished_ms=now,
            events_scanned=scanned,
            events_matched=matched,
            value_problems=problems,
            windows=windows,
            chunks=chunk,
        )
        try:
            store.retire_runs(t, m, run_id)
        except Exception as exc:  # garbage collection only: the next run retries it
            log.warning("backfill %s: removing the rows of replaced runs failed: %r", run_id, exc)
        log.info(
            "backfill of meter %s (%s) run %s complete: %d events scanned, %d matched, %d windows",
            meter.slug,
            t,
            run_id,
            scanned,
            matched,
            windows,
        )
        return BackfillResult(
            run_id, COMPLETE, resumed, rec.events_total, scanned, matched, problems, windows, chunk
        )
