"""The Faust worker: one agent on the events topic, flushing to the store exactly once.

Commit order (docs/architecture.md): messages are read with manual acks (``stream.noack()``) and
buffered; a flush (every ``flush_interval_s``, or at ``flush_max_events``) runs the
``BatchProcessor`` in a dedicated executor thread (dedupe -> events -> usage + progress insert ->
dedupe index) and only then acks the messages, so Kafka never runs ahead of ClickHouse. A failing
sink is retried with backoff while the batch is held; the agent stops pulling once the next buffer
is full (back-pressure), nothing is dropped. Before retrying, the store's progress is re-read: if
the failed commit actually landed (the insert is atomic), the batch is done, not inserted twice.

On assignment the partition's store progress ``M`` is read, the local dedupe index is brought up to
``M`` and every message with offset <= M is skipped. On revocation buffered messages are flushed
first. No Faust tables, windows or exactly_once (DESIGN §3).

``WorkerRunner`` runs the app on its own event loop, in the foreground (``tally worker``) or in a
background thread (embedded ``tally run``). Faust's ``Worker`` is not used: it wants the main
thread, installs signal handlers and configures logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import faust
from faust.types import EventT, StreamT

from streams.dedupe import DedupeIndex, rebuild
from streams.processor import Batch, BatchProcessor
from streams.progress import ProgressBoard
from streams.sink import Sink
from tally.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0


def _backoff(attempt: int) -> float:
    return float(min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(attempt, 10)))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class StreamWorker:
    """The worker's state. Everything but the executor jobs runs on the app's event loop."""

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        sink: Sink,
        board: ProgressBoard | None,
        dedupe_dir: Path,
    ) -> None:
        self.app = app
        self.settings = settings
        self.topic = settings.events_topic
        self.sink = sink
        self.board = board
        self.dedupe_dir = dedupe_dir
        self.horizon_ms = int(settings.dedupe_horizon.total_seconds() * 1000)
        self.max_events = settings.flush_max_events
        self.interval_s = settings.flush_interval_s
        self.indexes: dict[int, DedupeIndex] = {}
        self.processor = BatchProcessor(
            self.topic, sink, self._index_for, horizon_ms=self.horizon_ms
        )
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="tally-flush")
        self.stream: StreamT | None = None
        self.pending: list[EventT] = []  # Faust events of processor.current, to ack after flush
        self.stopping = False
        self.assigned = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._init_lock = asyncio.Lock()
        self._flush_task: asyncio.Task[None] | None = None
        self.commits = 0
        self._bg: set[asyncio.Task[None]] = set()
        self.dropped_on_stop = 0
        self.last_purge_ms = 0

    # --- helpers ----------------------------------------------------------------------------
    def _index_for(self, partition: int) -> DedupeIndex:
        idx = self.indexes.get(partition)
        if idx is None:
            idx = self.indexes[partition] = DedupeIndex.open(self.dedupe_dir, self.topic, partition)
        return idx

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _consumer_partitions(self) -> set[int]:
        try:
            return {tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.topic}
        except Exception:
            return set()

    # --- assignment -------------------------------------------------------------------------
    async def init_partitions(self, partitions: set[int]) -> None:
        """Read the store's progress, rebuild the dedupe index and start skipping <= M."""
        async with self._init_lock:
            todo = sorted(p for p in partitions if not self.processor.assigned(p))
            attempt = 0
            while todo and not self.stopping:
                try:
                    progress = await self._run(self.sink.progress, self.topic)
                    for p in todo:
                        m = progress.get(p, -1)
                        await self._run(
                            rebuild,
                            self._index_for(p),
                            self.sink,
                            self.topic,
                            p,
                            m,
                            _now_ms(),
                            self.horizon_ms,
                        )
                        self.processor.assign(p, m)
                        if self.board is not None and m >= 0:
                            self.board.notify(self.topic, p, m)
                        log.info("partition %s[%d] ready, store progress %d", self.topic, p, m)
                    break
                except Exception:
                    attempt += 1
                    log.exception("partition init of %s failed; retrying", todo)
                    await asyncio.sleep(_backoff(attempt))
                    todo = [p for p in todo if p in self._consumer_partitions()]

    async def on_partitions_assigned(self, sender: Any, assigned: set[Any], **kw: Any) -> None:
        parts = {tp.partition for tp in assigned if tp.topic == self.topic}
        await self.init_partitions(parts)
        self.assigned.set()

    async def on_partitions_revoked(self, sender: Any, revoked: set[Any], **kw: Any) -> None:
        parts = {tp.partition for tp in revoked if tp.topic == self.topic}
        if not parts:
            return
        deadline = time.monotonic() + self.settings.broker_session_timeout_s * 0.8
        try:
            await self.flush(deadline=deadline)
        except FlushAbandoned:
            log.warning("revoked partitions %s: buffered messages left for the next owner", parts)
        for p in parts:
            self.processor.revoke(p)
        self.pending = [e for e in self.pending if e.message.partition not in parts]
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
                if p not in self._consumer_partitions():
                    continue  # stale message of a revoked partition
                await self.init_partitions({p})
                if not self.processor.assigned(p):
                    continue
            try:
                accepted = self.processor.add(p, msg.offset, event.value)
            except Exception:
                log.exception("cannot buffer %s[%d]@%d", self.topic, p, msg.offset)
                continue
            if accepted:
                self.pending.append(event)
            else:
                await stream.ack(event)
            if self.processor.buffered_events >= self.max_events:
                if self._flush_lock.locked():
                    # back-pressure: a flush is running (or retrying) and the next batch is
                    # full: stop pulling until the store has caught up
                    await self.flush()
                else:  # flush in the background and keep reading meanwhile
                    task = asyncio.get_running_loop().create_task(self.flush())
                    self._bg.add(task)
                    task.add_done_callback(self._bg_done)

    # --- flushing ---------------------------------------------------------------------------
    def _bg_done(self, task: asyncio.Task[None]) -> None:
        self._bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background flush failed: %r", task.exception())

    async def flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self.stopping:
                return
            try:
                if self.processor.buffered_messages:
                    await self.flush()
                await self._maybe_purge()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("flush loop error")

    async def flush(self, *, deadline: float | None = None) -> None:
        """Flush what is buffered; retry until stored (or ``deadline``: FlushAbandoned)."""
        async with self._flush_lock:
            batch = self.processor.take()
            events, self.pending = self.pending, []
            if not batch.entries:
                for ev in events:
                    await self._ack(ev)
                return
            attempt = 0
            while True:
                owned = {p for p in batch.last_offsets if self.processor.assigned(p)}
                if owned != set(batch.last_offsets):
                    gone = set(batch.last_offsets) - owned
                    batch = batch.without_partitions(gone)
                    events = [e for e in events if e.message.partition not in gone]
                    if not batch.entries:
                        return
                try:
                    await self._run(self.processor.flush_batch, batch)
                    break
                except Exception as exc:
                    attempt += 1
                    log.error(
                        "flush of %d messages failed (attempt %d): %r", len(batch), attempt, exc
                    )
                    if await self._landed(batch):
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        # put it back in front of what was buffered since; not acked
                        batch.extend(self.processor.current)
                        self.processor.current = batch
                        self.pending = events + self.pending
                        raise FlushAbandoned from exc
                    await asyncio.sleep(_backoff(attempt))
            self.commits += 1
            for ev in events:
                await self._ack(ev)
            if self.board is not None:
                for p, off in batch.last_offsets.items():
                    self.board.notify(self.topic, p, off)

    async def _landed(self, batch: Batch) -> bool:
        try:
            return await self._run(self.processor.landed, batch)
        except Exception:
            return False

    async def _ack(self, event: EventT) -> None:
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

    # --- lifecycle --------------------------------------------------------------------------
    def start_flush_loop(self) -> None:
        self._flush_task = asyncio.get_running_loop().create_task(self.flush_loop())

    async def shutdown(self, *, flush: bool = True, timeout: float = 30.0) -> None:
        """Stop consuming, final flush + offset commit (unless ``flush=False``), stop the app."""
        self.stopping = True
        with contextlib.suppress(Exception):
            self.app.consumer.pause_partitions(self.app.consumer.assignment())
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(BaseException):
                await self._flush_task
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)
        if flush:
            try:
                await self.flush(deadline=time.monotonic() + timeout)
            except FlushAbandoned:
                log.error("final flush failed; the buffered messages will be replayed")
            with contextlib.suppress(Exception):
                # bounded: with a dead broker (embedded supervision) these never return
                await asyncio.wait_for(self.app.consumer.commit(), timeout)
        else:
            self.dropped_on_stop = self.processor.take().__len__()
            self.pending = []
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.app.stop(), timeout)
        self.executor.shutdown(wait=True)
        for idx in self.indexes.values():
            idx.close()
        self.indexes.clear()


class FlushAbandoned(Exception):
    """A flush could not be stored before its deadline (the batch was kept, not acked)."""


def build_app(
    settings: Settings,
    sink: Sink,
    board: ProgressBoard | None,
    *,
    dedupe_dir: Path,
    broker: str | None = None,
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
    worker = StreamWorker(app, settings, sink, board, dedupe_dir)
    topic = app.topic(
        settings.events_topic, value_type=bytes, value_serializer="raw", key_serializer="raw"
    )
    app.agent(topic, name="tally-events", concurrency=1)(worker.consume)
    app.on_partitions_assigned.connect(worker.on_partitions_assigned)  # type: ignore[arg-type]
    app.on_partitions_revoked.connect(worker.on_partitions_revoked)  # type: ignore[arg-type]
    app.tally_worker = worker  # type: ignore[attr-defined]
    return app


class WorkerRunner:
    """Run the worker on its own event loop: ``run_forever()`` (foreground) or ``start()``/``stop()``
    (background thread, embedded mode)."""

    def __init__(
        self,
        settings: Settings,
        sink: Sink,
        board: ProgressBoard | None = None,
        *,
        dedupe_dir: Path,
        broker: str | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.board = board
        self.dedupe_dir = Path(dedupe_dir)
        self.broker = broker
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
            self.settings, self.sink, self.board, dedupe_dir=self.dedupe_dir, broker=self.broker
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

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
