"""The Faust worker: one agent on the events topic, committing to the store exactly once.

Commit protocol (docs/architecture.md, "The worker's commit protocol"): messages are read with
manual acks (``stream.noack()``) and buffered per partition. Every ``flush_interval_s`` (or at
``flush_max_events``) the flusher seals each partition's buffer into a *link* ``[first, last]``
chained to the end of the store's chain, and makes one attempt in a dedicated executor thread
(``BatchProcessor.flush_batch``: read progress + claims -> events -> one token-deduplicated usage
+ progress insert per link -> read progress + claims again). Only a link the store is verified
to hold is acked, so Kafka never runs ahead of ClickHouse. An unresolved link is retried
UNCHANGED (same offsets, rows and token) with capped exponential backoff; the agent stops
pulling once the next buffer is full (back-pressure: paused, bounded memory, nothing dropped),
while the event loop stays free for the group's heartbeats and rebalances.

On assignment the worker writes a claim (epoch, owner) for each partition, reads the store's
progress ``M``, brings the local dedupe index up to ``M`` and skips every message with offset
<= M; a failing set-up backs off and retries. On revocation it makes one quick hand-over flush
when the store is healthy, then gives up the links of revoked partitions without acking them
(the new owner re-reads them from Kafka; the chain tokens make a link still in flight harmless).
A partition whose newest claim belongs to another owner is fenced: dropped, never committed.

The worker's status (``WorkerStatus``: state, last commit, failing since, last error, partitions)
is available in-process and written every ``worker_heartbeat_s`` to ``worker_heartbeats``. The
same monitor loop measures the lag and freshness of the worker's partitions (``streams.lag``:
log end from a fetch's high watermark, against the verified chain end) and publishes them with
the other gauges of ``streams.metrics.WorkerMetrics`` (injected; one registry per process).

``WorkerRunner`` runs the app on its own event loop, in the foreground (``tally worker``) or in a
background thread (embedded ``tally run``). Faust's ``Worker`` is not used: it wants the main
thread, installs signal handlers and configures logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import StreamT

from schemas.worker import WorkerStatus
from streams.dedupe import DedupeIndex, rebuild
from streams.lag import LagReport, LogProbe
from streams.metrics import WorkerMetrics
from streams.processor import Applied, BatchProcessor, Entry
from streams.progress import ProgressBoard
from streams.sink import Sink
from tally.errors import TallyError
from tally.process import thread_nice
from tally.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0


def _backoff(attempt: int) -> float:
    return float(min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(max(attempt - 1, 0), 10)))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_worker_id() -> str:
    """A worker instance id: host, pid and a random part (a restarted worker is a new owner)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _timestamp_ms(msg: Any) -> int | None:
    """The broker timestamp of a message (kept with its dead letters), if it has one."""
    ts = getattr(msg, "timestamp", None)
    return int(ts * 1000) if isinstance(ts, int | float) and ts > 0 else None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


class StreamWorker:
    """The worker's state. Everything but the executor jobs runs on the app's event loop."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        sink: Sink,
        board: ProgressBoard | None,
        dedupe_dir: Path,
        *,
        worker_id: str | None = None,
        fencing: bool = True,
        metrics: WorkerMetrics | None = None,
        probe: LogProbe | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.probe = probe
        # the newest lag measurement (None until the first one); read from any thread
        self.lag_report: LagReport | None = None
        self._summary_ms = _now_ms()
        self._summary_base = (0.0, 0.0)
        self.topic = settings.events_topic
        self.sink = sink
        self.board = board
        self.dedupe_dir = dedupe_dir
        self.worker_id = worker_id or new_worker_id()
        self.horizon_ms = int(settings.dedupe_horizon.total_seconds() * 1000)
        self.max_events = settings.flush_max_events
        self.interval_s = settings.flush_interval_s
        self.indexes: dict[int, DedupeIndex] = {}

        def flush_thread(prefix: str) -> ThreadPoolExecutor:
            # first on a busy machine: ``flush_thread_nice`` (docs/performance.md)
            return ThreadPoolExecutor(
                1,
                thread_name_prefix=prefix,
                initializer=thread_nice,
                initargs=(settings.flush_thread_nice,),
            )

        # the flush's second thread: its ledger insert runs there while the flush thread
        # computes the windows (``BatchProcessor.prepare``)
        self._ledger_executor = flush_thread("tally-ledger")
        self.processor = BatchProcessor(
            self.topic,
            sink,
            self._index_for,
            horizon_ms=self.horizon_ms,
            owner=self.worker_id if fencing else "",
            link_max_age_s=settings.link_max_age_s,
            dead_letter_max_bytes=settings.dead_letter_max_payload_bytes,
            metrics=self.metrics,
            late_ms=int(settings.late_event_s * 1000),
            ledger_executor=self._ledger_executor,
            # wait=stored: answered from the flush thread as soon as the read after the commit
            # shows the link stored, not after the index step and a turn of this event loop
            on_stored=None if board is None else functools.partial(board.notify, self.topic),
        )
        # the flush thread (prepare, the store's calls, the index)
        self.executor = flush_thread("tally-flush")
        self._hb_executor = ThreadPoolExecutor(1, thread_name_prefix="tally-heartbeat")
        self.stream: StreamT | None = None
        self.stopping = False
        self.assigned = asyncio.Event()
        self._kick = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._init_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flush_task: asyncio.Task[None] | None = None
        self._hb_task: asyncio.Task[None] | None = None
        # wait=stored: the newest offset read per partition, and whether a request waits
        # (streams.progress.ProgressBoard: flush as soon as what it waits for is read)
        self._read: dict[int, int] = {}
        self._wanted = False
        self._wake: Callable[[], None] | None = None
        self.fenced: set[int] = set()  # dropped for a newer claim; re-taken only when assigned
        self.dropped_on_stop = 0
        self.last_purge_ms = _now_ms()
        # status
        self.state = "starting"
        self.started_ms = _now_ms()
        self.last_commit_ms: int | None = None
        self.failing_since_ms: int | None = None
        self.last_error = ""
        self.commits = 0  # links stored (or adopted from another writer)
        self.fenced_total = 0
        self.revoked_dropped = 0  # messages given up at revocation (not acked)
        self.attempt_failures = 0  # attempts that met a store error (resolved or not)

    # --- helpers ----------------------------------------------------------------------------
    def _index_for(self, partition: int) -> DedupeIndex:
        idx = self.indexes.get(partition)
        if idx is None:
            idx = self.indexes[partition] = DedupeIndex.open(
                self.dedupe_dir,
                self.topic,
                partition,
                filter_max_bytes=int(self.settings.dedupe_filter_max_mb * 2**20),
            )
        return idx

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _consumer_partitions(self) -> set[int]:
        try:
            return {tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.topic}
        except Exception:
            return set()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker task failed: %r", task.exception())

    def _failed(self, what: str, exc: BaseException | None) -> None:
        self.attempt_failures += 1
        if self.failing_since_ms is None:
            self.failing_since_ms = _now_ms()
        if exc is not None:
            self.last_error = f"{what}: {_describe(exc)}"

    def _succeeded(self) -> None:
        if self.failing_since_ms is not None:
            log.info(
                "store commits go through again after %.1f s",
                (_now_ms() - self.failing_since_ms) / 1000,
            )
        self.failing_since_ms = None

    def status(self) -> WorkerStatus:
        return WorkerStatus(
            worker_id=self.worker_id,
            topic=self.topic,
            state=self.state,
            beat_ms=_now_ms(),
            started_ms=self.started_ms,
            last_commit_ms=self.last_commit_ms,
            failing_since_ms=self.failing_since_ms,
            last_error=self.last_error,
            partitions=tuple(self.processor.partitions),
        )

    # --- assignment -------------------------------------------------------------------------
    def _init_io(self, todo: list[int]) -> dict[int, tuple[int, int]]:
        """Executor: claim the partitions, read their progress, rebuild their dedupe indexes."""
        state = self.sink.read_chain(self.topic, todo)
        epochs: dict[int, int] = {}
        for p in todo:
            newest = state.claims.get(p)
            epochs[p] = max(_now_ms(), newest.epoch + 1 if newest is not None else 0)
            self.sink.write_claim(self.topic, p, epochs[p], self.worker_id)
        state = self.sink.read_chain(self.topic, todo)
        out: dict[int, tuple[int, int]] = {}
        for p in todo:
            m = state.progress.get(p, -1)
            rebuild(self._index_for(p), self.sink, self.topic, p, m, _now_ms(), self.horizon_ms)
            out[p] = (m, epochs[p])
        return out

    async def init_partitions(self, partitions: set[int]) -> None:
        """Claim, read the store's progress, rebuild the dedupe index, start skipping <= M.
        Retries with backoff while the partitions are still assigned by the group."""
        async with self._init_lock:
            attempt = 0
            while not self.stopping:
                owned = self._consumer_partitions()
                todo = sorted(
                    p
                    for p in partitions
                    if not self.processor.assigned(p) and p in owned and p not in self.fenced
                )
                if not todo:
                    return
                try:
                    ready = await self._run(self._init_io, todo)
                except Exception as exc:
                    attempt += 1
                    self.metrics.store_errors.inc()
                    self._failed(f"set-up of partitions {todo}", exc)
                    log.warning(
                        "set-up of partitions %s failed (attempt %d): %s",
                        todo,
                        attempt,
                        _describe(exc),
                    )
                    await asyncio.sleep(_backoff(attempt))
                    continue
                owned = self._consumer_partitions()
                for p, (m, epoch) in ready.items():
                    if p not in owned or self.processor.assigned(p):
                        continue  # revoked meanwhile
                    self.processor.assign(p, m, epoch)
                    if self.board is not None and m >= 0:
                        self.board.notify(self.topic, p, m)
                    log.info("partition %s[%d] ready, store progress %d", self.topic, p, m)
                if not self.processor.links():
                    self._succeeded()
                return

    async def _init_assigned(self, parts: set[int]) -> None:
        try:
            await self.init_partitions(parts)
        finally:
            if self.processor.partitions or not parts:
                self.assigned.set()
                if self.state == "starting":
                    self.state = "running"
                    self.metrics.up.set(1)

    async def on_partitions_assigned(self, sender: Any, assigned: set[Any], **kw: Any) -> None:
        parts = {tp.partition for tp in assigned if tp.topic == self.topic}
        self.fenced -= parts  # a fresh assignment by the group: claim them again
        # never block the rebalance on the store: set-up runs in the background
        self._spawn(self._init_assigned(parts))

    async def on_partitions_revoked(self, sender: Any, revoked: set[Any], **kw: Any) -> None:
        parts = {tp.partition for tp in revoked if tp.topic == self.topic}
        if not parts:
            return
        if (
            not self.stopping
            and self.failing_since_ms is None
            and not self._flush_lock.locked()
            and self.processor.held_messages
        ):
            # hand-over: store what is buffered if the store answers quickly; never wait long
            timeout = min(5.0, self.settings.broker_session_timeout_s * 0.4)
            try:
                await asyncio.wait_for(self.flush(), timeout)
            except (TimeoutError, Exception) as exc:
                log.info("hand-over flush of revoked partitions did not finish: %r", exc)
        dropped = 0
        for p in parts:
            dropped += len(self.processor.revoke(p))
        self.revoked_dropped += dropped
        if dropped:
            log.info("revoked %s: %d messages left to the next owner (not acked)", parts, dropped)
        with contextlib.suppress(Exception):
            await self.app.consumer.commit()

    # --- the agent --------------------------------------------------------------------------
    async def consume(self, stream: StreamT) -> None:
        self.stream = stream
        manual: Any = stream.noack()  # type: ignore[attr-defined]
        async for event in manual.events():
            msg = event.message
            p = msg.partition
            if self.stopping:
                continue  # not acked: redelivered to the next run
            if not self.processor.assigned(p):
                if p in self.fenced or p not in self._consumer_partitions():
                    continue  # stale message of a revoked or fenced partition
                await self.init_partitions({p})
                if not self.processor.assigned(p):
                    continue
            try:
                accepted = self.processor.add(p, msg.offset, event.value, event, _timestamp_ms(msg))
            except Exception:
                log.exception("cannot buffer %s[%d]@%d", self.topic, p, msg.offset)
                continue
            if not accepted:
                await stream.ack(event)
            self._read[p] = msg.offset
            if self._wanted:
                self._check_wanted()
            if self.processor.buffered_events >= self.max_events:
                self._kick.set()
                # back-pressure: stop pulling until the flusher has taken the buffer
                while self.processor.buffered_events >= self.max_events and not self.stopping:
                    await asyncio.sleep(0.05)

    # --- flushing ---------------------------------------------------------------------------
    def _on_wait(self) -> None:
        """A request started waiting for storage (wait=stored): flush once it is all read."""
        self._wanted = True
        self._check_wanted()

    def _check_wanted(self) -> None:
        board = self.board
        if board is None:
            self._wanted = False
            return
        if board.ready(self.topic, self._read):
            self._kick.set()
        self._wanted = board.waiting > 0

    async def flush_loop(self) -> None:
        attempt = 0
        while not self.stopping:
            if attempt:
                await asyncio.sleep(_backoff(attempt))
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), self.interval_s)
            self._kick.clear()
            if self.stopping:
                return
            try:
                ok = await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("flush error")
                self._failed("flush", exc)
                ok = False
            attempt = 0 if ok else attempt + 1
            try:
                await self._maybe_purge()
            except Exception:
                log.exception("dedupe index purge failed")

    async def flush(self) -> bool:
        """One round: seal buffers into links, one attempt at the store, settle the verdicts.
        True when nothing is left unresolved."""
        async with self._flush_lock:
            self.processor.seal()
            links = self.processor.links()
            if not links:
                return True
            try:
                await self._run(self.processor.prepare, links)
            except Exception as exc:
                self._failed("preparing a commit", exc)
                log.warning("preparing links failed: %s", _describe(exc))
                return False
            out = await self._run(self.processor.flush_batch, links)
            applied = self.processor.apply(out, links)
            await self._settle(applied)
            if applied.unresolved:
                self._failed("commit", out.error)
                log.warning(
                    "commit of partitions %s unresolved (attempt %d): %s",
                    applied.unresolved,
                    max((k.attempts for k in links), default=0),
                    _describe(out.error) if out.error else "store progress not there yet",
                )
                return False
            if out.error is not None:  # e.g. an answer lost, then verified: resolved all the same
                self.attempt_failures += 1
                self.last_error = f"commit (resolved): {_describe(out.error)}"
                log.info("commit resolved by reading the store after: %s", _describe(out.error))
            self._succeeded()
            return True

    async def _settle(self, applied: Applied) -> None:
        for e in applied.acks:
            await self._ack(e)
        done = applied.progress
        if done:
            self.commits += len(done)
            self.metrics.commits.inc(len(done))
            self.last_commit_ms = _now_ms()
            # (the board was told on the flush thread: ``BatchProcessor.on_stored``)
        if applied.fenced:
            self.fenced.update(applied.fenced)
            self.fenced_total += len(applied.fenced)
            self.metrics.fenced.inc(len(applied.fenced))
            log.error(
                "partitions %s of %s are fenced: another worker claimed them; this worker "
                "stops committing them (its buffered messages are not acked)",
                applied.fenced,
                self.topic,
            )

    async def _ack(self, entry: Entry) -> None:
        event = entry.handle
        if event is None:
            return
        if self.stream is not None:
            await self.stream.ack(event)
        else:  # pragma: no cover - events only come from the stream
            event.ack()

    async def _maybe_purge(self) -> None:
        now = _now_ms()
        if now - self.last_purge_ms < 3_600_000:
            return
        self.last_purge_ms = now
        for idx in list(self.indexes.values()):
            n = await self._run(idx.purge_older_than, now - self.horizon_ms)
            if n:
                log.info("dedupe index %s: purged %d ids older than the horizon", idx.path, n)

    # --- heartbeats -------------------------------------------------------------------------
    async def _beat(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._hb_executor, self.sink.write_heartbeat, self.status())
        try:
            await asyncio.wait_for(fut, timeout)
        except (TimeoutError, Exception) as exc:
            self.metrics.store_up.set(0)
            log.debug("heartbeat not written: %r", exc)
        else:
            self.metrics.store_up.set(1)

    async def heartbeat_loop(self) -> None:
        """The monitor loop: measure lag and freshness, update the gauges, write the heartbeat."""
        every = self.settings.worker_heartbeat_s
        while not self.stopping:
            await self.observe(timeout=min(5.0, max(1.0, every)))
            await self._beat(every * 2)
            await asyncio.sleep(every)

    async def observe(self, timeout: float = 5.0) -> LagReport:
        """Measure the lag and freshness of this worker's partitions (against its verified chain
        ends) and publish them with the other gauges."""
        m = self.metrics
        proc = self.processor
        stored = {p: proc.chain_end(p) for p in proc.partitions}
        m.partitions.set(len(stored))
        m.up.set(1 if self.state == "running" else 0)
        failing = self.failing_since_ms
        m.failing_seconds.set(0 if failing is None else max(0, _now_ms() - failing) / 1000)
        m.held_events.set(proc.held_events)
        m.dedupe_entries.set(sum(idx.entries + idx.pending for idx in list(self.indexes.values())))
        report: LagReport
        if self.probe is None:
            report = LagReport(_now_ms(), (), error="no lag probe", topic=self.topic)
        else:
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self._hb_executor, self.probe.measure, stored, timeout)
            try:
                report = await asyncio.wait_for(fut, timeout + 1.0)
            except (TimeoutError, Exception) as exc:
                m.lag_probe_errors.inc()
                log.debug("lag not measured: %r", exc)
                report = LagReport(_now_ms(), (), error=_describe(exc), topic=self.topic)
        m.broker_up.set(0 if report.error else 1)
        if not report.error:
            # partitions revoked while measuring are not ours to report
            owned = set(proc.partitions)
            m.set_lag({p: lag for p, lag in report.by_partition.items() if p in owned})
            m.freshness.set(report.freshness_s())
        self.lag_report = report
        self._log_summary(report)
        return report

    def _log_summary(self, report: LagReport) -> None:
        """One INFO line a minute while events are stored: counts, lag, freshness."""
        now = _now_ms()
        if now - self._summary_ms < 60_000:
            return
        read = self.metrics.registry.get_sample_value
        stored = read("tally_worker_events_total", {"outcome": "stored"}) or 0.0
        dups = read("tally_worker_events_total", {"outcome": "duplicate"}) or 0.0
        d_stored, d_dups = stored - self._summary_base[0], dups - self._summary_base[1]
        secs = (now - self._summary_ms) / 1000
        self._summary_ms, self._summary_base = now, (stored, dups)
        if d_stored or d_dups:
            log.info(
                "stored %d events (%d duplicates dropped) in the last %.0f s; lag %d messages, "
                "freshness %.1f s",
                d_stored,
                d_dups,
                secs,
                report.total_lag,
                report.freshness_s(),
                extra={
                    "events": int(d_stored),
                    "duplicates": int(d_dups),
                    "lag": report.total_lag,
                    "freshness_s": round(report.freshness_s(), 3),
                    "partitions": len(report.partitions),
                },
            )

    # --- lifecycle --------------------------------------------------------------------------
    def start_flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        self._flush_task = loop.create_task(self.flush_loop())
        self._hb_task = loop.create_task(self.heartbeat_loop())
        if self.board is not None:

            def wake() -> None:  # called on the waiting request's thread
                loop.call_soon_threadsafe(self._on_wait)

            self._wake = wake
            self.board.add_wake(wake)

    async def shutdown(self, *, flush: bool = True, timeout: float = 30.0) -> None:
        """Stop consuming, final flush + offset commit (unless ``flush=False``), stop the app."""
        self.stopping = True
        if self.board is not None and self._wake is not None:
            self.board.remove_wake(self._wake)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(Exception):
            self.app.consumer.pause_partitions(self.app.consumer.assignment())
        for task in (self._flush_task, self._hb_task, *self._tasks):
            if task is not None:
                task.cancel()
        for task in (self._flush_task, self._hb_task, *list(self._tasks)):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        if flush:
            attempt = 0
            while self.processor.held_messages and time.monotonic() < deadline:
                if not await self.flush():
                    attempt += 1
                    await asyncio.sleep(
                        min(_backoff(attempt), max(0.0, deadline - time.monotonic()))
                    )
            if self.processor.held_messages:
                log.error(
                    "final flush did not finish: %d messages will be replayed by the next owner",
                    self.processor.held_messages,
                )
            with contextlib.suppress(Exception):
                # bounded: with a dead broker (embedded supervision) these never return
                await asyncio.wait_for(self.app.consumer.commit(), timeout)
        else:
            self.dropped_on_stop = self.processor.held_messages
        self.state = "stopped"
        self.metrics.up.set(0)
        self.metrics.partitions.set(0)
        self.metrics.set_lag({})
        await self._beat(5.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.app.stop(), timeout)
        self.executor.shutdown(wait=True)
        self._ledger_executor.shutdown(wait=True)
        self._hb_executor.shutdown(wait=False)
        if self.probe is not None:
            self.probe.close()
        for idx in self.indexes.values():
            idx.close()
        self.indexes.clear()


def build_app(
    settings: Settings,
    sink: Sink,
    board: ProgressBoard | None,
    *,
    dedupe_dir: Path,
    broker: str | None = None,
    worker_id: str | None = None,
    fencing: bool = True,
    metrics: WorkerMetrics | None = None,
) -> faust.App:
    """The Faust app (``app.tally_worker`` is its StreamWorker). Build it on the loop it runs on."""
    bootstrap = broker or settings.kafka_bootstrap
    if not bootstrap:
        raise ValueError("kafka_bootstrap is empty: start the embedded broker first")
    dedupe_dir = Path(dedupe_dir)
    dedupe_dir.mkdir(parents=True, exist_ok=True)
    faust_dir = dedupe_dir.parent / "faust"
    faust_dir.mkdir(parents=True, exist_ok=True)
    servers = ";".join(f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip())
    app = faust.App(
        settings.consumer_group,
        broker=servers,
        web_enabled=False,
        broker_session_timeout=settings.broker_session_timeout_s,
        topic_partitions=settings.events_partitions,
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=False,
        autodiscover=False,
        store="memory://",
        datadir=str(faust_dir),
        topic_allow_declare=False,
    )
    app.transport = _Transport(app.conf.broker_consumer, app)
    probe = LogProbe(bootstrap, settings.events_topic, group=f"{settings.consumer_group}-lag")
    worker = StreamWorker(
        app,
        settings,
        sink,
        board,
        dedupe_dir,
        worker_id=worker_id,
        fencing=fencing,
        metrics=metrics,
        probe=probe,
    )
    topic = app.topic(
        settings.events_topic, value_type=bytes, value_serializer="raw", key_serializer="raw"
    )
    app.agent(topic, name="tally-events", concurrency=1)(worker.consume)
    app.on_partitions_assigned.connect(worker.on_partitions_assigned)  # type: ignore[arg-type]
    app.on_partitions_revoked.connect(worker.on_partitions_revoked)  # type: ignore[arg-type]
    app.tally_worker = worker  # type: ignore[attr-defined]
    return app


# How long a fetch may wait for data. Faust asks aiokafka for 1.5 s; the embedded broker (Tansu)
# answers a fetch only at the end of that wait, not when data arrives, which made every event
# wait ~0.5-1.5 s before the worker saw it (freshness, wait=stored answers). When there is data
# the fetch returns at once whatever this is; an idle worker sends ~1000/FETCH_MAX_WAIT_MS
# empty fetches per second.
FETCH_MAX_WAIT_MS = 50


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads it when the consumer starts (builds its Fetcher); Faust hard-codes it
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class WorkerStartError(TallyError):
    """The stream worker failed to start or did not get ready partitions in time."""

    status = 503
    code = "worker_unavailable"


class WorkerRunner:
    """Run the worker on its own event loop: ``run_forever()`` (foreground) or ``start()``/``stop()``
    (background thread, embedded mode). ``status()`` is safe to call from any thread."""

    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        board: ProgressBoard | None = None,
        *,
        dedupe_dir: Path,
        broker: str | None = None,
        worker_id: str | None = None,
        fencing: bool = True,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.sink = sink
        self.board = board
        self.dedupe_dir = Path(dedupe_dir)
        self.broker = broker
        self.worker_id = worker_id or new_worker_id()
        self.fencing = fencing
        self.started_ms = _now_ms()
        self.app: faust.App | None = None
        self.worker: StreamWorker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._done = threading.Event()
        self._stop_req: asyncio.Event | None = None
        self._stop_flush = True
        self._stop_timeout = 30.0

    # --- the loop's main coroutine ----------------------------------------------------------
    async def _main(self) -> None:
        self._stop_req = asyncio.Event()
        app = self.app = build_app(
            self.settings,
            self.sink,
            self.board,
            dedupe_dir=self.dedupe_dir,
            broker=self.broker,
            worker_id=self.worker_id,
            fencing=self.fencing,
            metrics=self.metrics,
        )
        worker = self.worker = app.tally_worker  # type: ignore[attr-defined]
        try:
            await app.start()
            worker.start_flush_loop()
            ready = asyncio.ensure_future(worker.assigned.wait())
            stop = asyncio.ensure_future(self._stop_req.wait())
            stopped = asyncio.ensure_future(app.wait_until_stopped())
            await asyncio.wait({ready, stop, stopped}, return_when=asyncio.FIRST_COMPLETED)
            self._ready.set()
            await asyncio.wait({stop, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for f in (ready, stop, stopped):
                f.cancel()
            if app.crash_reason is not None and self.error is None:
                self.error = app.crash_reason
            await worker.shutdown(flush=self._stop_flush, timeout=self._stop_timeout)
        except BaseException as exc:
            if self.error is None:  # visible to start() before it wakes up
                self.error = exc
            raise
        finally:
            self._ready.set()

    def _run_loop(self, install_signals: bool) -> None:
        loop = self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self._request_stop_in_loop)
            loop.run_until_complete(self._main())
        except BaseException as exc:
            self.error = exc
            log.exception("worker failed")
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                self.metrics.up.set(0)  # however the worker ended
                self._ready.set()
                self._done.set()

    def _request_stop_in_loop(self) -> None:
        if self._stop_req is not None:
            self._stop_req.set()

    # --- public -----------------------------------------------------------------------------
    def run_forever(self) -> int:
        """Foreground: run until SIGTERM/SIGINT, then final flush + commit. Returns an exit code."""
        self._run_loop(install_signals=True)
        return 0 if self.error is None else 1

    def start(self, timeout: float = 60.0) -> bool:
        """Background thread. Returns True once partitions are assigned and ready, False after
        ``timeout``. Raises the worker's error if it failed to start."""
        self._thread = threading.Thread(
            target=self._run_loop, args=(False,), name="tally-worker", daemon=True
        )
        self._thread.start()
        ok = self._ready.wait(timeout)
        if self.error is not None:
            raise self.error
        return ok and self.worker is not None and self.worker.assigned.is_set()

    def start_or_fail(self, timeout: float) -> None:
        """``start``, raising ``WorkerStartError`` (with the cause) instead of returning False."""
        try:
            ok = self.start(timeout)
        except Exception as exc:
            self._done.wait(30.0)  # let the worker thread finish its clean-up
            raise WorkerStartError(f"the stream worker failed to start: {_describe(exc)}") from exc
        if not ok:
            st = self.status()
            cause = f" (last error: {st.last_error})" if st.last_error else ""
            self.stop(timeout=5.0, flush=False)
            raise WorkerStartError(
                f"the stream worker had no ready partitions after {timeout:.0f} s{cause}; "
                "check the broker (TALLY_KAFKA_BOOTSTRAP) and the store"
            )

    def stop(self, timeout: float = 30.0, *, flush: bool = True) -> None:
        """Graceful stop: stop consuming, final flush + offset commit, leave the group.

        ``flush=False`` (tests) drops what is buffered without storing or acking it, like a crash
        between two flushes.
        """
        self._stop_flush = flush
        self._stop_timeout = timeout
        loop = self.loop
        if loop is not None and not self._done.is_set():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._request_stop_in_loop)
        if self._thread is not None:
            self._thread.join(timeout + 30.0)

    def lag_report(self) -> LagReport | None:
        """The newest lag measurement of the worker (None before the first one)."""
        worker = self.worker
        return worker.lag_report if worker is not None else None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> WorkerStatus:
        """The worker's status; ``stopped`` once its thread has ended (or before it started
        when it failed)."""
        worker = self.worker
        if worker is not None:
            st = worker.status()
        else:
            st = WorkerStatus(
                worker_id=self.worker_id,
                topic=self.settings.events_topic,
                state="starting",
                beat_ms=_now_ms(),
                started_ms=self.started_ms,
            )
        ended = self._done.is_set() or (self._thread is not None and not self._thread.is_alive())
        if ended and st.state != "stopped":
            err = st.last_error or (_describe(self.error) if self.error is not None else "")
            st = WorkerStatus(
                worker_id=st.worker_id,
                topic=st.topic,
                state="stopped",
                beat_ms=st.beat_ms,
                started_ms=st.started_ms,
                last_commit_ms=st.last_commit_ms,
                failing_since_ms=st.failing_since_ms,
                last_error=err,
                partitions=(),
            )
        return st
