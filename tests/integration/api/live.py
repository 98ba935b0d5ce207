"""A whole Tally in this process, as ``tally run`` wires it: the HTTP API (uvicorn, a real port)
producing to a real Tansu topic, the stream worker consuming it into a real chDB database, and
``wait=stored`` answered from the worker's progress rows. chDB allows one process per directory,
so everything runs in threads of the test process (tests/integration/api/test_openmeter_sdk.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from api.app import create_app
from api.producer import EventProducer
from api.secretbox import generate_key
from clickhouse.repo import Repo
from clickhouse.sink import ClickHouseSink
from runtime.broker import free_port
from streams.progress import StoreProgressWaiter
from streams.worker import WorkerRunner
from tally.settings import Settings, WaitMode
from tests.integration.api.conftest import ADMIN_TOKEN, make_settings


@dataclass
class Live:
    url: str
    settings: Settings
    store: Any
    producer: EventProducer
    runner: WorkerRunner
    app: Any

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class _Server:
    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@contextmanager
def live_tally(
    broker: Any, topic: str, store: Any, unique: str, tmp_path: Path, **overrides: Any
) -> Iterator[Live]:
    """The API + worker of one test (fresh topic, group and database)."""
    base: dict[str, Any] = dict(
        consumer_group=f"g-{unique}",
        events_partitions=4,
        ingest_wait=WaitMode.BROKER,
        max_events_per_request=100,
        max_request_bytes=256 * 1024,
        wait_stored_timeout_s=60.0,
        flush_interval_s=0.2,
        broker_session_timeout_s=10.0,
        data_dir=tmp_path,
        secrets_key=generate_key(),
    )
    base.update(overrides)
    settings = make_settings(broker, topic, **base)
    repo = Repo(store)
    repo.ensure_admin_token(ADMIN_TOKEN)
    sink = ClickHouseSink(store)
    runner = WorkerRunner(settings, sink, dedupe_dir=tmp_path / "dedupe")
    if not runner.start(timeout=120):
        runner.stop(timeout=10)
        raise AssertionError("the worker did not get its partitions")
    producer = EventProducer(broker.bootstrap, topic, timeout_s=10.0)
    app = create_app(
        settings,
        store,
        producer=producer,
        progress_waiter=StoreProgressWaiter(sink, poll_s=0.05),
        repo=repo,
        worker_status=lambda: [runner.status()],
    )
    server = _Server(app)
    try:
        server.start()
        yield Live(f"http://127.0.0.1:{server.port}", settings, store, producer, runner, app)
    finally:
        server.stop()
        runner.stop(timeout=30)
        producer.close(5)


__all__ = ["Live", "live_tally"]
