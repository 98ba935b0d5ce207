"""Wiring of the roles: embedded (`tally run`), `tally api`, `tally worker`, `tally migrate`.

This is the only module that knows how the packages fit together. Each role makes ONE metrics
registry (``tally.metrics.process_registry``) and hands it to the API's and the worker's
metrics: `tally run` serves both on the API's /metrics; `tally worker` serves its own /metrics,
/healthz and /readyz on ``worker_metrics_host:worker_metrics_port`` (default 9464). Shutdown order of `tally run`
(SIGINT/SIGTERM): the HTTP server stops accepting and finishes in-flight requests (which may be
waiting for the worker to store their events) → the producer drains → the worker makes its final
flush and commits → the broker stops → exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from tally.errors import TallyError
from tally.settings import Settings

if TYPE_CHECKING:
    from clickhouse.repo import Repo

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


def admin_token_line(repo: Repo, settings: Settings) -> str | None:
    """Store the admin token if needed (``Repo.ensure_admin_token``) and return the line to print
    at start: the plaintext of a token generated now (shown once), a mention of a token stored
    now from ``TALLY_ADMIN_TOKEN`` (the operator has it: a secret given is never echoed into
    logs), else None."""
    token = repo.ensure_admin_token(settings.admin_token or None)
    if token is None:
        return None
    if settings.admin_token:
        return "Admin token: the one in TALLY_ADMIN_TOKEN (stored hashed)"
    return f"Admin token (shown once, keep it): {token}"


def announce(url: str, data_dir: Path, token_line: str | None) -> None:
    """`tally run` is up: write the run file (url, pid) and tell the user where and how."""
    (data_dir / RUN_FILE).write_text(json.dumps({"url": url, "pid": os.getpid()}))
    print(f"Tally is running at {url}  (data: {data_dir})", flush=True)
    if token_line:
        print(token_line, flush=True)
    print("Create a tenant: tally tenant create NAME   Stop: Ctrl-C", flush=True)


@dataclass
class Core:
    """Store + repository, opened and migrated."""

    store: Any
    repo: Any

    @classmethod
    def open(cls, settings: Settings) -> Core:
        from clickhouse.repo import Repo
        from clickhouse.store import open_store

        store = open_store(settings)
        applied = store.migrate()
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        return cls(store=store, repo=Repo(store))


def _build_app(
    settings: Settings,
    core: Core,
    producer: Any,
    waiter: Any,
    worker_status: Any,
    *,
    lag_source: Any = None,
    metrics: Any = None,
) -> Any:
    from api.app import create_app

    return create_app(
        settings,
        core.store,
        producer=producer,
        progress_waiter=waiter,
        worker_status=worker_status,
        lag_source=lag_source,
        metrics=metrics,
    )


def _note_signal(signum: int, _frame: Any) -> None:
    log.info("received signal %s, shutting down", signum)


def _serve(app: Any, settings: Settings, on_started: Any = None, on_server: Any = None) -> None:
    import uvicorn

    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.wait_stored_timeout_s) + 5,
    )
    server = uvicorn.Server(config)
    if on_server is not None:
        on_server(server)
    # uvicorn re-raises the signal that stopped it to the handler that was installed before it
    # started; make that one harmless so the caller's graceful shutdown (drain, flush) runs.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note_signal)
    if on_started is not None:
        _orig = server.startup

        async def startup(sockets: Any = None) -> None:
            await _orig(sockets=sockets)
            if server.started:
                port = settings.api_port
                for s in server.servers:
                    for sock in s.sockets:
                        port = sock.getsockname()[1]
                on_started(port)

        server.startup = startup  # type: ignore[method-assign]
    server.run()


def embedded_secrets_key(settings: Settings, data_dir: Any) -> str:
    """``secrets_key`` if set, else the key in ``<data_dir>/secrets.key`` (created once, 0600)."""
    given = settings.secrets_key.get_secret_value()
    if given:
        return given
    from api.secretbox import generate_key

    path = data_dir / "secrets.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return str(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(generate_key() + "\n")
    log.info("created the secrets key %s (keep it with the data directory)", path)
    return str(path.read_text().strip())


# `tally run` has one worker, so more partitions only add work: each flush writes one link (one
# INSERT, one new part on disk) per partition, and the API splits each request into one envelope
# per partition (docs/performance.md, "One events partition in `tally run`").
EMBEDDED_PARTITIONS = 1
PARTITIONS_FILE = "partitions"


def embedded_partitions(settings: Settings, data_dir: Path) -> int:
    """The events topic's partition count for this data directory, fixed for its lifetime.

    The dedupe index is one file per partition *number* and an id's partition is
    ``hash(tenant, id) % partitions`` in every topic generation, so a retry is only recognised
    if the count never changes (docs/architecture.md, "Topic generations"). The first start
    writes ``<data_dir>/partitions`` (``events_partitions`` if set, else 1); a directory from
    before that file existed keeps the count of its index files. Setting ``events_partitions``
    to another count than the directory's is refused, naming the setting.
    """
    from streams.dedupe import indexed_partitions
    from tally.errors import ValidationError

    path = data_dir / PARTITIONS_FILE
    pinned: int | None = None
    if path.exists():
        text = path.read_text().strip()
        if not text.isdigit() or int(text) < 1:
            raise ValidationError(
                f"{path} must hold the partition count (a positive integer), not {text!r}",
                field="events_partitions",
            )
        pinned = int(text)
    else:
        pinned = indexed_partitions(data_dir / "dedupe")
    given = "events_partitions" in settings.model_fields_set
    if pinned is not None and given and settings.events_partitions != pinned:
        raise ValidationError(
            f"events_partitions={settings.events_partitions}, but the data directory "
            f"{data_dir} was created with {pinned} partitions; the count cannot change (an "
            "event's partition is hash(tenant, id) % partitions, so a retried event would be "
            "missed by the dedupe index). Unset TALLY_EVENTS_PARTITIONS or use a new data "
            "directory",
            field="events_partitions",
        )
    count = (
        pinned
        if pinned is not None
        else settings.events_partitions
        if given
        else EMBEDDED_PARTITIONS
    )
    if not path.exists():
        path.write_text(f"{count}\n")
    return count


def embedded_settings(settings: Settings) -> Settings:
    """`tally run`'s settings, both layouts: the data directory resolved and created, the
    partition count of the directory, ``wait=stored`` by default and the secrets key."""
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return settings.model_copy(
        update={
            "data_dir": data_dir,
            "events_partitions": embedded_partitions(settings, data_dir),
            # Decided before kafka_bootstrap is filled in: embedded answers after storage.
            "ingest_wait": settings.effective_ingest_wait,
            "secrets_key": SecretStr(embedded_secrets_key(settings, data_dir)),
        }
    )


def run_embedded(settings: Settings) -> None:
    """`tally run`: broker child + chDB + worker thread + HTTP API, one process.

    The broker child is supervised (``runtime.supervisor``): if it dies, it is restarted on a new
    topic generation; if it cannot be, the server stops and this raises ``TallyError`` (exit 1).
    ``embedded_processes = "split"`` (the default) runs the API in a child process instead
    (``runtime.split``); this function is the ``single`` mode.
    """
    from tally.process import tune_process
    from tally.settings import EmbeddedProcesses

    tune_process(settings)
    if settings.embedded_processes == EmbeddedProcesses.SPLIT:
        from runtime.split import run_split

        run_split(settings)
        return
    from api.state import Metrics
    from clickhouse.sink import ClickHouseSink
    from runtime.supervisor import BrokerSupervisor, EmbeddedPipeline
    from streams.metrics import WorkerMetrics
    from streams.progress import ProgressBoard
    from tally.metrics import process_registry

    base_topic = settings.events_topic
    settings = embedded_settings(settings)
    data_dir = settings.data_dir
    pipeline: EmbeddedPipeline | None = None
    supervisor: BrokerSupervisor | None = None
    server_ref: list[Any] = []
    try:
        # The embedded broker keeps messages in memory only: every start is a new log, so it
        # gets a new topic generation (worker progress is kept per topic in ClickHouse).
        core = Core.open(settings)
        token_line = admin_token_line(core.repo, settings)
        board = ProgressBoard()
        registry = process_registry()  # API and worker metrics, served together on /metrics
        pipeline = EmbeddedPipeline(
            settings,
            data_dir,
            ClickHouseSink(core.store),
            board,
            base_topic,
            metrics=WorkerMetrics(registry),
        )
        gen = pipeline.start()
        settings = pipeline.settings_for(gen.broker.bootstrap, gen.topic)
        # the worker of the current generation (it changes when the broker is restarted)
        app = _build_app(
            settings,
            core,
            gen.producer,
            board,
            lambda: [pipeline.current.worker.status()] if pipeline and pipeline.current else [],
            lag_source=lambda: (
                pipeline.current.worker.lag_report() if pipeline and pipeline.current else None
            ),
            metrics=Metrics(registry, settings),
        )

        def swap_producer(producer: Any) -> None:
            app.state.tally.producer = producer

        def fatal(_message: str) -> None:
            if server_ref:
                server_ref[0].should_exit = True

        main_loop: list[asyncio.AbstractEventLoop] = []

        def spawn_on_main_thread(fn: Any) -> Any:
            # PR_SET_PDEATHSIG follows the spawning thread: spawn from the main thread (its
            # event loop), which lives as long as the process (runtime.supervisor).
            if not main_loop:
                raise TallyError("the HTTP server is not running; cannot restart the broker")

            async def call() -> Any:
                return fn()

            return asyncio.run_coroutine_threadsafe(call(), main_loop[0]).result(timeout=60)

        pipeline.spawner = spawn_on_main_thread  # type: ignore[method-assign]
        supervisor = BrokerSupervisor(pipeline, swap_producer, fatal).start()

        def started(port: int) -> None:
            main_loop.append(asyncio.get_running_loop())
            announce(f"http://{settings.api_host}:{port}", data_dir, token_line)

        _serve(app, settings, started, server_ref.append)
    finally:
        log.info("shutting down")
        if supervisor is not None:
            supervisor.stop()
        if pipeline is not None:
            pipeline.stop()
        (data_dir / RUN_FILE).unlink(missing_ok=True)
        log.info("stopped")
    if supervisor is not None and supervisor.fatal is not None:
        raise TallyError(supervisor.fatal)


def _require_external(settings: Settings) -> None:
    missing = [
        name
        for name, value in (
            ("TALLY_KAFKA_BOOTSTRAP", settings.kafka_bootstrap),
            ("TALLY_CLICKHOUSE_URL", settings.clickhouse_url),
        )
        if not value
    ]
    if missing:
        raise TallyError(f"scale-out roles need {' and '.join(missing)} (or use `tally run`)")


def run_api(settings: Settings) -> None:
    from api.producer import EventProducer
    from api.state import Metrics
    from api.topics import create_topic
    from clickhouse.sink import ClickHouseSink
    from streams.lag import LogProbe
    from streams.progress import StoreProgressWaiter
    from streams.status import stale_after_s
    from tally.metrics import process_registry
    from tally.process import tune_process

    tune_process(settings)
    _require_external(settings)
    core = Core.open(settings)
    create_topic(settings.kafka_bootstrap, settings.events_topic, settings.events_partitions)
    token_line = admin_token_line(core.repo, settings)
    if token_line:
        print(token_line, flush=True)
    producer = EventProducer(
        settings.kafka_bootstrap, settings.events_topic, timeout_s=settings.produce_timeout_s
    )
    sink = ClickHouseSink(core.store)
    waiter = StoreProgressWaiter(sink)
    stale_s = stale_after_s(settings.worker_heartbeat_s)

    def heartbeats() -> list[Any]:
        # the workers are other processes: judge them by the heartbeats they write
        return sink.heartbeats(settings.events_topic, int((time.time() - stale_s) * 1000))

    # lag and freshness of every partition, measured here: the store's progress against the log
    probe = LogProbe(
        settings.kafka_bootstrap, settings.events_topic, group=f"{settings.consumer_group}-readyz"
    )

    def lag_report() -> Any:
        progress = sink.progress(settings.events_topic)
        stored = {p: progress.get(p, -1) for p in range(producer.partitions)}
        return probe.measure(stored, timeout=3.0)

    metrics = Metrics(process_registry(), settings)
    try:
        _serve(
            _build_app(
                settings,
                core,
                producer,
                waiter,
                heartbeats,
                lag_source=lag_report,
                metrics=metrics,
            ),
            settings,
        )
    finally:
        producer.close()
        probe.close()


@dataclass
class Served:
    """A uvicorn server running in its own thread (``serve_in_thread``)."""

    server: Any
    port: int
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait (up to ``timeout``) for the thread: requests in flight finish
        first, so what they use can be closed after this."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("the HTTP server thread did not stop within %.0f s", timeout)


def serve_in_thread(
    app: Any, host: str, port: int, timeout: float = 15.0, what: str = "HTTP", hint: str = ""
) -> Served:
    """Serve ``app`` with uvicorn in a daemon thread; returns once it listens. Raises
    ``TallyError`` naming ``what`` when it cannot (e.g. the port is taken; ``hint`` says how to
    choose another)."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="tally-health", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise TallyError(f"cannot serve {what} on {host}:{port} (is the port taken?{hint})")
        time.sleep(0.02)
    bound = port
    for srv in server.servers:
        for sock in srv.sockets:
            bound = sock.getsockname()[1]
    return Served(server, int(bound), thread)


def run_worker(settings: Settings) -> None:
    from api.health import create_health_app
    from api.state import AppState, Metrics
    from api.topics import create_topic
    from clickhouse.sink import ClickHouseSink
    from streams.lag import LogProbe
    from streams.metrics import WorkerMetrics
    from streams.worker import WorkerRunner
    from tally.metrics import process_registry
    from tally.process import tune_process

    tune_process(settings)
    _require_external(settings)
    core = Core.open(settings)
    create_topic(settings.kafka_bootstrap, settings.events_topic, settings.events_partitions)
    registry = process_registry()
    runner = WorkerRunner(
        settings,
        ClickHouseSink(core.store),
        None,
        dedupe_dir=settings.data_dir / "dedupe",
        metrics=WorkerMetrics(registry),
    )
    pinger = LogProbe(
        settings.kafka_bootstrap, settings.events_topic, group=f"{settings.consumer_group}-ping"
    )
    state = AppState(
        settings=settings,
        store=core.store,
        repo=core.repo,
        producer=None,
        progress_waiter=None,
        worker_status=lambda: [runner.status()],
        lag_source=runner.lag_report,
        broker_ping=pinger.ping,
        metrics=Metrics(registry, settings),
    )
    host = settings.worker_metrics_host
    served = serve_in_thread(
        create_health_app(state),
        host,
        settings.worker_metrics_port,
        what="/metrics",
        hint=" set TALLY_WORKER_METRICS_PORT, 0 = any free port",
    )
    print(
        f"Tally worker: metrics, health and readiness on http://{host}:{served.port}/metrics",
        flush=True,
    )
    try:
        code = runner.run_forever()
    finally:
        # a readiness request in flight pings the broker with ``pinger``: let it finish first
        served.stop()
        pinger.close()
    if code != 0:
        err = runner.error
        detail = f"{type(err).__name__}: {err}" if err is not None else "unknown error"
        raise TallyError(f"the stream worker stopped on an error: {detail}")


def running_server(settings: Settings) -> str | None:
    """URL of a `tally run` holding this data directory, if one is alive."""
    path = settings.data_dir / RUN_FILE
    try:
        info = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
        return str(info["url"])
    except (OSError, ValueError, KeyError):
        return None


def admin_call(
    url: str, token: str, method: str, path: str, body: Any = None, timeout: float | None = 30
) -> Any:
    import httpx

    resp = httpx.request(
        method,
        url + path,
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout,
    )
    if resp.status_code >= 400:
        try:
            msg = resp.json().get("message", resp.text)
        except ValueError:
            msg = resp.text
        raise TallyError(f"{method} {path} failed ({resp.status_code}): {msg}")
    return resp.json()
