"""`tally run` in two processes (``embedded_processes = "split"``, the default).

One Python process has one GIL: with the API and the worker in it, Tally never used more than
about one core. In split mode `tally run` is:

- **the main process** (the one the user started; its pid is in ``run.json``): owns the chDB
  directory (chDB allows one process per directory), runs the stream worker in process exactly as
  ``single`` mode does (the commit protocol and its store client are unchanged), supervises the
  embedded broker (``runtime.supervisor``), and serves on loopback
  - the store (``clickhouse.server.StoreServer``: the ClickHouse HTTP protocol over its chDB),
  - the wait socket (``runtime.waithop.WaitServer``: a ``wait=stored`` request waiting on the
    worker's ``ProgressBoard``, which also wakes the worker as in ``single`` mode; one persistent
    UNIX-domain connection per API child, many waits multiplexed on it), and
  - a small control app (``create_control_app``): ``GET /generation`` (the broker and topic the
    API must produce to), ``GET /status`` and ``GET /lag`` (the worker's status and lag for
    ``/readyz``) and ``GET /metrics`` (the worker's metrics, which the API's ``/metrics``
    re-exports);
- **the API process** (a child): the HTTP API on the user's host and port, with the store at the
  store server's URL, its own producer on the current topic generation (it follows
  ``/generation``), ``runtime.waithop.SocketProgressWaiter`` for ``wait=stored``.

Guarantees: the API child and the broker child die with the main process (``PR_SET_PDEATHSIG``,
spawned from the main thread, which lives as long as the process), so a kill -9 of `tally run`
leaves nothing holding the data directory. An API child that exits while Tally is not stopping is
restarted on the same port (at most ``api_max_restarts`` times per ``broker_restart_window_s``);
beyond that `tally run` stops with exit code 1 and says why. SIGTERM/SIGINT: the API child stops
first (in-flight requests that wait for storage are answered: the worker still runs), then the
broker supervision, the worker's final flush, the broker, the store server; exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import queue
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from tally.errors import TallyError
from tally.settings import Settings

if TYPE_CHECKING:
    from runtime.roles import Served

log = logging.getLogger(__name__)

CONTROL_ENV = "TALLY_RUN_CONTROL_URL"  # not a setting: where the API child finds the main process
WAIT_ENV = "TALLY_RUN_WAIT_SOCKET"  # not a setting: the main process's wait socket (waithop)
PORT_FD_ENV = "TALLY_RUN_PORT_FD"  # the pipe on which the API child reports its bound port
GENERATION_POLL_S = 0.5
API_START_TIMEOUT_S = 90.0


# ---- settings across processes ---------------------------------------------------------------


def settings_env(settings: Settings) -> dict[str, str]:
    """``TALLY_<NAME>`` variables that rebuild ``settings`` in a child process."""
    out: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, Enum):
            text = str(value.value)
        elif isinstance(value, timedelta):
            text = f"PT{value.total_seconds()!r}S"
        elif isinstance(value, (list, tuple, set, frozenset, dict)):
            text = json.dumps(list(value) if not isinstance(value, dict) else value, default=str)
        else:
            text = str(value)
        out[f"TALLY_{name.upper()}"] = text
    return out


# ---- the main process's control app --------------------------------------------------------


def _status_json(status: Any) -> dict[str, Any]:
    return dataclasses.asdict(status)


def _status_from(data: dict[str, Any]) -> Any:
    from schemas.worker import WorkerStatus

    data = dict(data)
    data["partitions"] = tuple(data.get("partitions") or ())
    return WorkerStatus(**data)


def _lag_from(data: dict[str, Any] | None) -> Any:
    from streams.lag import LagReport, PartitionLag

    if data is None:
        return None
    parts = tuple(PartitionLag(**p) for p in data.get("partitions") or ())
    return LagReport(**{**data, "partitions": parts})


def create_control_app(pipeline: Any, registry: Any) -> Any:
    """The main process's loopback endpoints for its API child (see the module docstring)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def generation(_request: Request) -> Response:
        gen = pipeline.current
        if gen is None:
            return JSONResponse({"error": "no broker generation"}, status_code=503)
        return JSONResponse(
            {
                "bootstrap": gen.broker.bootstrap,
                "topic": gen.topic,
                "generation": pipeline.generations,
            }
        )

    async def status(_request: Request) -> Response:
        gen = pipeline.current
        return JSONResponse([_status_json(gen.worker.status())] if gen is not None else [])

    async def lag(_request: Request) -> Response:
        gen = pipeline.current
        report = await asyncio.to_thread(gen.worker.lag_report) if gen is not None else None
        return JSONResponse(dataclasses.asdict(report) if report is not None else None)

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/generation", generation),
            Route("/status", status),
            Route("/lag", lag),
            Route("/metrics", metrics),
        ]
    )


# ---- the API child's side ----------------------------------------------------------------------


class RemoteWorkerMetrics:
    """A collector that re-exports the main process's worker metrics on the API's /metrics
    (``tally run`` served both on one /metrics before the split; names are unchanged). The main
    process's own process_* / python_* series are left out: the API child has its own."""

    def __init__(self, control_url: str, client: Any) -> None:
        self.url = control_url + "/metrics"
        self.client = client

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = self.client.get(self.url, timeout=3.0).text
        except httpx.HTTPError as exc:
            log.warning("cannot read the worker's metrics from the main process: %s", exc)
            return
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(("process_", "python_")):
                yield family


def run_api_child() -> None:
    """Entry point of the API child (``python -m runtime.split``): settings from the env."""
    import httpx

    from api.producer import EventProducer
    from api.state import Metrics
    from runtime.roles import Core, _build_app, _serve
    from runtime.waithop import SocketProgressWaiter
    from tally import log as logsetup
    from tally.metrics import process_registry
    from tally.process import tune_process

    settings = Settings()  # type: ignore[call-arg]  # from the TALLY_* env
    logsetup.configure(settings.log_level, settings.log_format.value)
    tune_process(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per control call otherwise
    control = os.environ[CONTROL_ENV]
    port_fd = int(os.environ[PORT_FD_ENV])
    from clickhouse.repo import Repo

    store = _open_store(settings)
    core = Core(store=store, repo=Repo(store))
    producer = EventProducer(
        settings.kafka_bootstrap, settings.events_topic, timeout_s=settings.produce_timeout_s
    )
    # one client for every call to the main process (a new client per call builds an SSL
    # context each time: measurable in the profile)
    http = httpx.Client(timeout=5.0)
    registry = process_registry()
    registry.register(RemoteWorkerMetrics(control, http))

    def worker_status() -> list[Any]:
        resp = http.get(control + "/status")
        resp.raise_for_status()
        return [_status_from(s) for s in resp.json()]

    def lag_report() -> Any:
        resp = http.get(control + "/lag")
        resp.raise_for_status()
        return _lag_from(resp.json())

    app = _build_app(
        settings,
        core,
        producer,
        SocketProgressWaiter(os.environ[WAIT_ENV]),
        worker_status,
        lag_source=lag_report,
        metrics=Metrics(registry, settings),
    )
    stop = threading.Event()

    def follow_generation() -> None:
        # the broker is restarted on a new topic generation by the main process: produce there
        while not stop.wait(GENERATION_POLL_S):
            try:
                gen = http.get(control + "/generation", timeout=2.0).json()
                current = app.state.tally.producer
                if gen.get("topic") and gen["topic"] != current.topic:
                    new = EventProducer(
                        gen["bootstrap"], gen["topic"], timeout_s=settings.produce_timeout_s
                    )
                    app.state.tally.producer = new
                    log.warning("API producing to %s on %s", gen["topic"], gen["bootstrap"])
                    with contextlib.suppress(Exception):
                        current.close(timeout=0.5)
            except Exception as exc:  # the main process restarting the broker, or stopping
                log.debug("reading the broker generation failed: %s", exc)

    follower = threading.Thread(target=follow_generation, name="tally-generation", daemon=True)
    follower.start()

    def started(port: int) -> None:
        with os.fdopen(port_fd, "w") as f:
            f.write(f"{port}\n")

    try:
        _serve(app, settings, started)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            app.state.tally.producer.close()


def _open_store(settings: Settings) -> Any:
    from clickhouse.store import Store

    # migrated by the main process already
    return Store.open(settings.clickhouse_url, settings.clickhouse_database)


# ---- the main process ----------------------------------------------------------------------


class ApiChild:
    """The API child process: started from the main thread (``PR_SET_PDEATHSIG``)."""

    def __init__(
        self, settings: Settings, env: dict[str, str], generation: Callable[[], Any]
    ) -> None:
        self.settings = settings
        self.env = env
        self.generation = generation  # the current broker generation (it changes on restarts)
        self.port = settings.api_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = API_START_TIMEOUT_S) -> int:
        from runtime.broker import _die_with_parent

        read_fd, write_fd = os.pipe()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        env.update(self.env)
        gen = self.generation()
        if gen is not None:
            env["TALLY_KAFKA_BOOTSTRAP"] = gen.broker.bootstrap
            env["TALLY_EVENTS_TOPIC"] = gen.topic
        env["TALLY_API_PORT"] = str(self.port)
        env[PORT_FD_ENV] = str(write_fd)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.split"],
                env=env,
                pass_fds=(write_fd,),
                preexec_fn=_die_with_parent,
            )
        finally:
            os.close(write_fd)
        try:
            line = _read_line(read_fd, timeout, self.proc)
        finally:
            os.close(read_fd)
        if not line:
            code = self.proc.poll()
            self.kill()
            raise TallyError(
                f"the API process did not start (exit code {code}; is port {self.port} taken?)"
            )
        self.port = int(line)
        return self.port

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def stop(self, timeout: float) -> int | None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc is not None else None
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the API process did not stop in %.0fs; killing it", timeout)
            return self.kill()

    def kill(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait() if self.proc is not None else None


def _read_line(fd: int, timeout: float, proc: subprocess.Popen[bytes]) -> str:
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or (proc.poll() is not None and not sel.select(0)):
                return ""
            if sel.select(min(left, 0.5)):
                chunk = os.read(fd, 256)
                if not chunk:
                    return ""
                buf += chunk
    finally:
        sel.close()
    return buf.split(b"\n", 1)[0].decode().strip()


def run_split(settings: Settings) -> None:
    """`tally run` as a main process (worker + chDB + broker supervision) and an API child."""
    from api.topics import create_topic  # noqa: F401  (imported here: fail early if missing)
    from clickhouse.server import StoreServer
    from clickhouse.sink import ClickHouseSink
    from runtime.roles import (
        RUN_FILE,
        Core,
        admin_token_line,
        announce,
        embedded_settings,
        serve_in_thread,
    )
    from runtime.supervisor import BrokerSupervisor, EmbeddedPipeline
    from runtime.waithop import WaitServer
    from streams.metrics import WorkerMetrics
    from streams.progress import ProgressBoard
    from tally.metrics import process_registry

    base_topic = settings.events_topic
    settings = embedded_settings(settings)
    data_dir = settings.data_dir
    stop = threading.Event()
    fatal: list[str] = []
    jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
    main_thread = threading.current_thread()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received signal %s, shutting down", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    def spawn_on_main_thread(fn: Callable[[], Any]) -> Any:
        # PR_SET_PDEATHSIG follows the spawning thread: spawn from the main thread
        if threading.current_thread() is main_thread:
            return fn()
        if stop.is_set():
            raise TallyError("tally run is stopping; not starting a new broker")
        fut: Future[Any] = Future()
        jobs.put((fn, fut))
        return fut.result(timeout=60)

    def on_fatal(message: str) -> None:
        fatal.append(message)
        stop.set()

    store_server: StoreServer | None = None
    pipeline: EmbeddedPipeline | None = None
    supervisor: BrokerSupervisor | None = None
    control: Served | None = None
    waits: WaitServer | None = None
    api: ApiChild | None = None
    try:
        core = Core.open(settings)
        token_line = admin_token_line(core.repo, settings)
        store_server = StoreServer(settings.chdb_dir.resolve()).start()
        board = ProgressBoard()
        registry = process_registry()
        pipeline = EmbeddedPipeline(
            settings,
            data_dir,
            ClickHouseSink(core.store),
            board,
            base_topic,
            metrics=WorkerMetrics(registry),
            with_producer=False,
        )
        pipeline.spawner = spawn_on_main_thread  # type: ignore[method-assign]
        gen = pipeline.start()
        control = serve_in_thread(create_control_app(pipeline, registry), "127.0.0.1", 0)
        waits = WaitServer(board).start()
        child_settings = pipeline.settings_for(gen.broker.bootstrap, gen.topic).model_copy(
            update={"clickhouse_url": store_server.url}
        )
        env = settings_env(child_settings)
        env[CONTROL_ENV] = f"http://127.0.0.1:{control.port}"
        env[WAIT_ENV] = waits.address
        api = ApiChild(child_settings, env, lambda: pipeline.current if pipeline else None)
        port = api.start()
        supervisor = BrokerSupervisor(pipeline, lambda _producer: None, on_fatal).start()
        announce(f"http://{settings.api_host}:{port}", data_dir, token_line)
        restarts: deque[float] = deque()
        while not stop.is_set():
            try:
                fn, fut = jobs.get(timeout=0.2)
            except queue.Empty:
                pass
            else:
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)
                continue
            code = api.poll()
            if code is None or stop.is_set():
                continue
            message = _restart_api(api, code, restarts, settings)
            if message is not None:
                on_fatal(message)
    finally:
        log.info("shutting down")
        stop.set()
        while not jobs.empty():  # a broker start that was waiting for the main thread
            _fn, fut = jobs.get_nowait()
            fut.set_exception(TallyError("tally run is stopping"))
        if api is not None:
            api.stop(settings.wait_stored_timeout_s + 15)
        if supervisor is not None:
            supervisor.stop()
            if supervisor.fatal is not None and not fatal:
                fatal.append(supervisor.fatal)
        if control is not None:
            control.stop()  # its requests in flight read the pipeline: let them finish
        if waits is not None:
            waits.stop()
        if pipeline is not None:
            pipeline.stop()
        if store_server is not None:
            store_server.stop()
        (data_dir / RUN_FILE).unlink(missing_ok=True)
        log.info("stopped")
    if fatal:
        raise TallyError(fatal[0])


def _restart_api(
    api: ApiChild, code: int, restarts: deque[float], settings: Settings
) -> str | None:
    """Restart a dead API child; the reason to stop `tally run` when it may not be."""
    pid = api.proc.pid if api.proc is not None else None
    log.error("the API process (pid %s) exited with code %s; restarting it", pid, code)
    now = time.monotonic()
    while restarts and now - restarts[0] > settings.broker_restart_window_s:
        restarts.popleft()
    if len(restarts) >= settings.api_max_restarts:
        return (
            f"the API process died {len(restarts) + 1} times within "
            f"{settings.broker_restart_window_s:g}s (api_max_restarts="
            f"{settings.api_max_restarts})"
        )
    restarts.append(now)
    try:
        port = api.start()
    except TallyError as exc:
        return f"the API process died and could not be restarted: {exc.message}"
    log.warning(
        "API process restarted: pid %s on port %s", api.proc.pid if api.proc else None, port
    )
    return None


if __name__ == "__main__":
    try:
        run_api_child()
    except TallyError as exc:
        print(f"error: {exc.message}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(0)
