"""/readyz names the store, the migrations, the broker, the stream worker, the lag and the
freshness (real Tansu, real chDB, a real worker): red when the worker has stopped, when it cannot
commit, when the store is down, when a migration is missing, and when the consumer is stuck
(alive, heartbeating, failing nothing, storing nothing while messages wait); in embedded style
(the worker in the process) and scale-out style (heartbeats in the store, lag measured from the
store's progress and the log)."""

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
from streams.lag import LogProbe
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


ALL_OK = {
    "store": "ok",
    "migrations": "ok",
    "broker": "ok",
    "worker": "ok",
    "lag": "ok",
    "freshness": "ok",
}


async def _produce(producer: EventProducer, tenant: str, n: int, tag: str) -> None:
    evs = [Event(id=f"{tag}{i}", type="api", customer="c", time=utc_now()) for i in range(n)]
    for env in group(tenant, epoch_ms(utc_now()), evs, 4, 1):
        await producer.produce([env])  # one message per event


def _on_worker_loop(runner: WorkerRunner, fn: Any) -> None:
    assert runner.loop is not None
    runner.loop.call_soon_threadsafe(fn)


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
        lag_source=runner.lag_report,
    )
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://tally"
        ) as c:
            body = await _until(c, lambda code, b: code == 200)
            assert body["status"] == "ready"
            assert body["checks"] == ALL_OK
            assert body["components"]["migrations"] == {"pending": []}
            assert body["components"]["lag"]["total"] == 0
            assert body["components"]["freshness"]["seconds"] == 0
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
        lag_source=runner.lag_report,
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
            assert body["checks"]["migrations"] == "unknown: the store is unreachable"
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

    probe = LogProbe(broker.bootstrap, topic, group=f"g-{unique}-readyz")

    def lag_report() -> Any:  # as `tally api` measures it: the store's progress against the log
        progress = sink.progress(topic)
        return probe.measure({p: progress.get(p, -1) for p in range(4)})

    app = create_app(
        settings, store, producer=None, progress_waiter=None, repo=Repo(store),
        worker_status=heartbeats, lag_source=lag_report,
    )  # fmt: skip
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://tally"
    ) as c:
        code, body = await _ready(c)
        assert code == 503 and body["checks"]["worker"] == "no worker status in the last 10 s"
        runner = _worker(settings, sink, tmp_path)
        try:
            body = await _until(c, lambda code, b: code == 200)
            assert body["checks"] == {
                "store": "ok",
                "migrations": "ok",
                "worker": "ok",
                "lag": "ok",
                "freshness": "ok",
            }
            (w,) = body["components"]["worker"]["workers"]
            assert w["id"] == runner.worker_id and w["partitions"] == [0, 1, 2, 3]
        finally:
            runner.stop(timeout=30)
        body = await _until(c, lambda code, b: code == 503)
        assert body["checks"]["worker"] == "stopped"
        # messages produced while no worker runs: the lag measured from the store says so
        producer = EventProducer(broker.bootstrap, topic, timeout_s=5.0)
        try:
            await _produce(producer, "acme", 6, "late")
        finally:
            producer.close(5)
        body = await _until(c, lambda code, b: b["components"]["lag"].get("total") == 6)
        assert body["checks"]["lag"] == "ok"  # 6 <= worker_max_lag
    probe.close()


async def test_stuck_consumer_turns_freshness_and_lag_red(
    broker: Any, topic: str, store: Any, unique: str, tmp_path: Path
) -> None:
    """OpenMeter #4987: lag grew for 16 h while health stayed green. Here the worker is alive,
    heartbeats, fails nothing -- and its consumer delivers nothing: /readyz must say so."""
    settings = make_settings(
        broker,
        topic,
        consumer_group=f"g-{unique}",
        events_partitions=4,
        worker_heartbeat_s=0.5,
        worker_max_freshness_s=3.0,
        worker_max_lag=5,
        flush_interval_s=0.2,
    )
    runner = _worker(settings, ClickHouseSink(store), tmp_path)
    producer = EventProducer(broker.bootstrap, topic, timeout_s=5.0)
    tenant, _ = Repo(store).create_tenant("acme")
    app = create_app(
        settings,
        store,
        producer=producer,
        progress_waiter=None,
        repo=Repo(store),
        worker_status=lambda: [runner.status()],
        lag_source=runner.lag_report,
    )
    app_ = runner.app
    assert app_ is not None
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://tally"
        ) as c:
            await _produce(producer, tenant.tenant_id, 8, "a")
            sink = ClickHouseSink(store)
            deadline = time.monotonic() + 60
            while sum(m + 1 for m in sink.progress(topic).values()) < 8:  # all 8 stored
                assert time.monotonic() < deadline, sink.progress(topic)
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.5)  # a measurement taken after they were stored
            body = await _until(
                c, lambda code, b: code == 200 and b["components"]["lag"]["total"] == 0
            )
            assert body["checks"] == ALL_OK
            # the consumer stops delivering: the worker stays up and has nothing to fail on
            _on_worker_loop(
                runner, lambda: app_.consumer.pause_partitions(app_.consumer.assignment())
            )
            await asyncio.sleep(1.0)
            await _produce(producer, tenant.tenant_id, 12, "b")
            body = await _until(
                c,
                lambda code, b: (
                    code == 503 and b["checks"]["freshness"] != "ok" and b["checks"]["lag"] != "ok"
                ),
                timeout=90,
            )
            checks = body["checks"]
            assert checks["worker"] == "ok", checks  # what fooled the peer
            assert checks["store"] == checks["broker"] == "ok"
            assert "the worker is stuck or too slow" in checks["freshness"], checks
            assert "12 messages wait unstored (max 5)" in checks["lag"], checks
            assert body["components"]["lag"]["total"] == 12
            assert body["components"]["freshness"]["seconds"] > 3.0
            assert "freshness" in body["message"] and "lag" in body["message"]
            # the consumer delivers again: the backlog is stored and /readyz turns green
            _on_worker_loop(
                runner, lambda: app_.consumer.resume_partitions(app_.consumer.assignment())
            )
            body = await _until(c, lambda code, b: code == 200, timeout=90)
            assert body["checks"] == ALL_OK
            assert body["components"]["lag"]["total"] == 0
    finally:
        runner.stop(timeout=30)
        producer.close(5)


async def test_missing_migration_is_named(broker: Any, topic: str, store: Any) -> None:
    settings = make_settings(broker, topic)
    app = create_app(settings, store, producer=None, progress_waiter=None, repo=Repo(store))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://tally"
    ) as c:
        code, body = await _ready(c)
        assert code == 200 and body["checks"] == {"store": "ok", "migrations": "ok"}, body
        store.command(
            f"DELETE FROM {store.database}.schema_migrations WHERE name = '050_billing.sql'"
        )
        code, body = await _ready(c)
        assert code == 503, body
        assert body["checks"]["migrations"] == "1 not applied: 050_billing.sql"
        assert body["components"]["migrations"] == {"pending": ["050_billing.sql"]}
        store.migrate()  # idempotent statements: applying it again is harmless
        code, body = await _ready(c)
        assert code == 200, body
