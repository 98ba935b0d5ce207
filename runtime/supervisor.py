"""Supervision of the embedded broker (`tally run`).

The Tansu child keeps messages in memory only. If it dies, ``BrokerSupervisor`` (a thread
polling the child every ``POLL_S``) notices within about a second and restarts the pipeline on a
NEW topic generation, the same way a fresh start would:

1. start a new broker child (new port) and create ``<events_topic>.g<now ms>`` on it;
2. swap the API's producer for one on the new topic (``AppState.producer``; the ingest handler
   reads it per request, and waits for progress of ``producer.topic``); the old producer is closed,
   its unacknowledged requests get 503 and are retried by their clients;
3. stop the old worker (it stores what it had already fetched; its offsets cannot be committed,
   nothing depends on them) and start a new one on the new topic. Progress rows are per topic and
   the dedupe index spans generations (docs/architecture.md), so events retried by clients are
   counted once even if the old generation had stored them.

With the embedded default ``wait=stored`` nothing acknowledged is lost: an answer was 2xx only once
its events were in ClickHouse. (With ``wait=broker`` in embedded mode, events acknowledged by the
dead broker but not yet fetched by the worker are lost; that is why stored is the default.)

The child must be spawned by a thread that lives as long as the process: the broker is asked to
die with its parent (``PR_SET_PDEATHSIG``), and Linux sends that signal when the *thread* that
forked it ends. ``run_embedded`` therefore sets ``EmbeddedPipeline.spawner`` to run the spawn on
the main thread's event loop (uvicorn's), never on the supervisor thread.

Restarts are limited to ``broker_max_restarts`` per ``broker_restart_window_s``; a broker that
cannot be restarted (or restarts too often) makes `tally run` log the reason and exit non-zero.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tally.errors import TallyError
from tally.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 0.5
START_ATTEMPTS = 3


def new_generation(base: str) -> str:
    from schemas.topics import generation_topic

    return generation_topic(base, int(time.time() * 1000))


class Generation:
    """One broker child with its topic, worker and producer."""

    def __init__(self, broker: Any, topic: str, worker: Any, producer: Any) -> None:
        self.broker = broker
        self.topic = topic
        self.worker = worker
        self.producer = producer


class EmbeddedPipeline:
    """Starts (and restarts) broker + topic + worker + producer of `tally run`."""

    def __init__(
        self,
        settings: Settings,
        data_dir: Path,
        sink: Any,
        board: Any,
        base_topic: str,
        metrics: Any = None,
        *,
        with_producer: bool = True,
    ) -> None:
        self.settings = settings
        # split mode (runtime.split): the API process has its own producer; none here
        self.with_producer = with_producer
        # one WorkerMetrics per process, shared by every generation's worker (a second one on the
        # same registry would raise "Duplicated timeseries")
        self.metrics = metrics
        self.data_dir = data_dir
        self.sink = sink
        self.board = board
        self.base_topic = base_topic
        self.current: Generation | None = None
        self.generations = 0

    def settings_for(self, bootstrap: str, topic: str) -> Settings:
        return self.settings.model_copy(
            update={"kafka_bootstrap": bootstrap, "events_topic": topic}
        )

    def start_broker(self) -> Any:
        """A new broker child, spawned by ``self.spawner`` (see ``BrokerSupervisor``)."""
        from runtime.broker import BrokerProcess

        return self.spawner(BrokerProcess(log_file=self.data_dir / "broker.log").start)

    @staticmethod
    def spawner(fn: Callable[[], Any]) -> Any:
        return fn()

    def start(self, broker: Any | None = None) -> Generation:
        """A new generation (on ``broker`` if given, else on a new broker child)."""
        from api.producer import EventProducer
        from api.topics import create_topic
        from streams.worker import WorkerRunner

        broker = broker or self.start_broker()
        topic = new_generation(self.base_topic)
        settings = self.settings_for(broker.bootstrap, topic)
        worker = producer = None
        try:
            create_topic(broker.bootstrap, topic, settings.events_partitions)
            worker = WorkerRunner(
                settings,
                self.sink,
                self.board,
                dedupe_dir=self.data_dir / "dedupe",
                metrics=self.metrics,
            )
            # a worker that fails or has no ready partitions in time: WorkerStartError
            worker.start_or_fail(settings.worker_start_timeout_s)
            if self.with_producer:
                producer = EventProducer(
                    broker.bootstrap, topic, timeout_s=settings.produce_timeout_s
                )
        except BaseException:
            if worker is not None:
                worker.stop(timeout=5)
            broker.stop()
            raise
        self.generations += 1
        self.current = Generation(broker, topic, worker, producer)
        return self.current

    def stop(self) -> None:
        """Graceful stop: producer drains, worker flushes and commits, broker stops."""
        gen, self.current = self.current, None
        if gen is None:
            return
        try:
            if gen.producer is not None:
                gen.producer.close()
        finally:
            try:
                gen.worker.stop()
            finally:
                gen.broker.stop()


class BrokerSupervisor:
    """Watches the current generation's broker child; restarts the pipeline when it dies."""

    def __init__(
        self,
        pipeline: EmbeddedPipeline,
        swap_producer: Callable[[Any], None],
        on_fatal: Callable[[str], None],
        poll_s: float = POLL_S,
    ) -> None:
        self.pipeline = pipeline
        self.swap_producer = swap_producer
        self.on_fatal = on_fatal
        self.poll_s = poll_s
        self.fatal: str | None = None
        self.restarts: deque[float] = deque()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # held while restarting: stop() waits for it
        self._thread = threading.Thread(
            target=self._run, name="tally-broker-supervisor", daemon=True
        )

    def start(self) -> BrokerSupervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            gen = self.pipeline.current
            proc = getattr(gen.broker, "proc", None) if gen is not None else None
            if proc is None or proc.poll() is None:
                continue
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._restart(gen, proc.returncode)
                except Exception as exc:  # anything unexpected is fatal too
                    log.exception("restarting the embedded broker failed")
                    self._give_up(f"restarting the embedded broker failed: {exc}")
                    return
                if self.fatal is not None:
                    return

    def _give_up(self, message: str) -> None:
        self.fatal = message
        log.critical("%s; stopping `tally run` (exit code 1)", message)
        self.on_fatal(message)

    def _restart(self, gen: Any, code: int | None) -> None:
        s = self.pipeline.settings
        log.error(
            "embedded broker (pid %s, topic %s) exited with code %s; restarting it with a new "
            "topic generation. Unacknowledged ingest requests fail with 503 meanwhile and are "
            "retried by clients (dedupe keeps the counts exact).",
            gen.broker.proc.pid,
            gen.topic,
            code,
        )
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > s.broker_restart_window_s:
            self.restarts.popleft()
        if len(self.restarts) >= s.broker_max_restarts:
            self._give_up(
                f"the embedded broker died {len(self.restarts) + 1} times within "
                f"{s.broker_restart_window_s:g}s (broker_max_restarts={s.broker_max_restarts}); "
                f"see {self.pipeline.data_dir / 'broker.log'}"
            )
            return
        self.restarts.append(now)
        broker = None
        last: Exception | None = None
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                broker = self.pipeline.start_broker()
                break
            except (TallyError, OSError) as exc:
                last = exc
                log.error("starting a new embedded broker failed (attempt %d): %s", attempt, exc)
                time.sleep(attempt)
        if broker is None:
            self._give_up(f"the embedded broker died and could not be restarted: {last}")
            return
        # The old worker first: it stores what it had fetched and releases its dedupe index.
        if gen.producer is not None:
            with contextlib.suppress(Exception):
                gen.producer.close(timeout=0.5)
        gen.worker.stop(timeout=3)
        if gen.worker.running:
            log.warning("the old worker did not stop in time; continuing without it")
        new = self.pipeline.start(broker)
        self.swap_producer(new.producer)
        log.warning(
            "embedded broker restarted: pid %s on %s, topic %s (generation %d)",
            broker.proc.pid,
            broker.bootstrap,
            new.topic,
            self.pipeline.generations,
        )
