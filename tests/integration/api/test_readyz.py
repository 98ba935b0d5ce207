"""/readyz names the store, the broker and the stream worker (real Tansu, real chDB, a real
worker): red when the worker has stopped, when it cannot commit, when the store is down; in
embedded style (the worker in the process) and scale-out style (heartbeats in the store)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.producer import EventProducer
from clickhouse.repo import Repo
from clickhouse.sink import ClickHouseSink
from schemas.envelope import group
from schemas.events import Event
from schemas.timeutil import epoch_ms, utc_now
from streams.worker import WorkerRunner
from tests.integration.api.conftest import make_settings
from tests.support.faulty_store import FaultyStore

pytestmark = pytest.mark.anyio


def _worker(settings: Any, sink: Any, tmp_path: Path) -> WorkerRunner:
    runner = WorkerRunner(settings, sink, dedupe_dir=tmp_path / "dedupe")
    assert runner.start(timeout=90), "worker did not get its partitions"
    return runner


async def _ready(c: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    r = await c.get("/readyz")
    return r.status_code, r.json()


async def _until(c: httpx.AsyncClient, pred: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        code, body = await _ready(c)
        if pred(code, body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz never matched: {code} {body}")
        await asyncio.sleep(0.3)


async def test_embedded_worker_stopped_turns_readyz_red(
    broker: Any, topic: str, store: Any, unique: str, tmp_path: Path
) -> None:
    settings = make_settings(broker, topic, consumer_group=f"g-{unique}", events_partitions=4)
    runner = _worker(settings, ClickHouseSink(store), tmp_path)
    producer = EventProducer(broker.bootstrap, topic, timeout_s=5.0)
    app = create_app(
        settings,
        store,
        producer=producer,
        progress_waiter=None,
        repo=Repo(store),
        worker_status=lambda: [runner.status()],
    )
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://tally"
        ) as c:
            code, body = await _ready(c)
            assert code == 200, body
            assert body["status"] == "ready"
            assert body["checks"] == {"store": "ok", "broker": "ok", "worker": "ok"}
            (w,) = body["components"]["worker"]["workers"]
            assert w["state"] == "running" and w["partitions"] == [0, 1, 2, 3]
            runner.stop(timeout=30)
            r = await c.get("/readyz")
            assert r.status_code == 503 and r.headers["retry-after"] == "3"
            body = r.json()
            assert body["checks"]["worker"] == "stopped"
            assert body["checks"]["store"] == "ok" and body["checks"]["broker"] == "ok"
            assert "worker stopped" in body["message"] and body["error"] == "unavailable"
    finally:
        runner.stop(timeout=10)
        producer.close(5)


async def test_store_down_names_store_and_worker(
    broker: Any, topic: str, store: Any, unique: str, tmp_path: Path
) -> None:
    settings = make_settings(
        broker,
        topic,
        consumer_group=f"g-{unique}",
        events_partitions=4,
        worker_max_failing_s=1.0,
        flush_interval_s=0.2,
    )
    faulty = FaultyStore(store)
    runner = _worker(settings, ClickHouseSink(faulty), tmp_path)
    producer = EventProducer(broker.bootstrap, topic, timeout_s=5.0)
    repo = Repo(store)
    tenant, _ = repo.create_tenant("acme")
    app = create_app(
        settings,
        faulty,
        producer=producer,
        progress_waiter=None,
        repo=Repo(faulty),
        worker_status=lambda: [runner.status()],
    )
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://tally"
        ) as c:
            await _until(c, lambda code, b: code == 200)
            faulty.down = True
            evs = [Event(id=f"e{i}", type="api", customer="c", time=utc_now()) for i in range(20)]
            for env in group(tenant.tenant_id, epoch_ms(utc_now()), evs, 4, 100):
                await producer.produce([env])
            body = await _until(
                c, lambda code, b: code == 503 and b["checks"]["worker"].startswith("cannot")
            )
            assert body["checks"]["store"].startswith("unreachable")
            assert body["checks"]["broker"] == "ok"
            (w,) = body["components"]["worker"]["workers"]
            assert w["failing_since"] is not None and "injected fault" in w["last_error"]
            assert runner.running  # backing off, not crashed
            faulty.down = False
            body = await _until(c, lambda code, b: code == 200)
            assert body["checks"]["worker"] == "ok"
    finally:
        faulty.down = False
        runner.stop(timeout=30)
        producer.close(5)


async def test_scaleout_readyz_judges_worker_heartbeats(
    broker: Any, topic: str, store: Any, unique: str, tmp_path: Path
) -> None:
    settings = make_settings(
        broker, topic, consumer_group=f"g-{unique}", events_partitions=4, worker_heartbeat_s=0.5
    )
    sink = ClickHouseSink(store)

    def heartbeats() -> list[Any]:
        return sink.heartbeats(topic, int((time.time() - 10) * 1000))

    app = create_app(
        settings, store, producer=None, progress_waiter=None, repo=Repo(store),
        worker_status=heartbeats,
    )  # fmt: skip
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://tally"
    ) as c:
        code, body = await _ready(c)
        assert code == 503 and body["checks"]["worker"] == "no worker status in the last 10 s"
        runner = _worker(settings, sink, tmp_path)
        try:
            body = await _until(c, lambda code, b: code == 200)
            assert body["checks"] == {"store": "ok", "worker": "ok"}
            (w,) = body["components"]["worker"]["workers"]
            assert w["id"] == runner.worker_id and w["partitions"] == [0, 1, 2, 3]
        finally:
            runner.stop(timeout=30)
        body = await _until(c, lambda code, b: code == 503)
        assert body["checks"]["worker"] == "stopped"
