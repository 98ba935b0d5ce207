"""A meter created while the worker lags: every event counts exactly once, stream + backfill.

Real parts end to end: the API (create meter = markers on every partition, ingest, backfill,
usage queries), a Tansu topic, the Faust worker (``WorkerRunner``) and chDB. The ground truth is
computed from the events sent (first copy of an id wins), never from Tally's code.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from api.app import create_app
from api.producer import EventProducer
from clickhouse.repo import Repo
from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store
from tally.settings import Settings, WaitMode
from tests.integration.streams.helpers import PARTITIONS, Worker, wait_stored, worker_settings

pytestmark = pytest.mark.anyio

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
GB = {
    "slug": "gb",
    "event_type": "upload",
    "aggregation": "sum",
    "value_property": "$.gb",
}
COUNT = {"slug": "n", "event_type": "upload", "aggregation": "count"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Events:
    """Events with duplicates (same id re-sent later with another payload: the first copy wins)
    and their ground truth."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.first: dict[str, dict[str, Any]] = {}
        self.n = 0

    def batch(self, size: int, dup_rate: float = 0.2) -> list[dict[str, Any]]:
        out = []
        for _ in range(size):
            if self.first and self.rnd.random() < dup_rate:
                eid = self.rnd.choice(list(self.first))
            else:
                self.n += 1
                eid = f"ev-{self.n}"
            ev = {
                "id": eid,
                "type": "upload",
                "customer": f"c{self.rnd.randrange(4)}",
                "time": (NOW - timedelta(minutes=self.rnd.randrange(0, 600)))
                .isoformat()
                .replace("+00:00", "Z"),
                "properties": {"gb": self.rnd.choice([self.rnd.randint(1, 50), "2.25"])},
            }
            if eid in self.first:  # a retry keeps its customer; the payload differs
                ev["customer"] = self.first[eid]["customer"]
            self.first.setdefault(eid, ev)
            out.append(ev)
        return out

    def truth(self) -> dict[str, dict[str, Decimal]]:
        gb: dict[str, Decimal] = {}
        n: dict[str, Decimal] = {}
        for ev in self.first.values():
            c = ev["customer"]
            gb[c] = gb.get(c, Decimal(0)) + Decimal(str(ev["properties"]["gb"]))
            n[c] = n.get(c, Decimal(0)) + 1
        return {"gb": gb, "n": n}


@pytest.fixture
async def api(
    broker: Any, topic: str, store: Store, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    settings = Settings(
        kafka_bootstrap=broker.bootstrap,
        events_topic=topic,
        events_partitions=PARTITIONS,
        ingest_wait=WaitMode.BROKER,
        admin_token="adm-activation-test-0123456789",
        backfill_chunk_events=97,
        backfill_wait_s=60.0,
    )
    repo = Repo(store)
    _tenant, key = repo.create_tenant("acme")
    producer = EventProducer(broker.bootstrap, topic, timeout_s=10.0)
    app = create_app(settings, store, producer=producer, progress_waiter=None, repo=repo)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://tally", timeout=300
    ) as c:
        yield c, {"Authorization": f"Bearer {key}"}
    producer.close(5)


async def send(c: httpx.AsyncClient, h: dict[str, str], events: list[dict[str, Any]]) -> None:
    for i in range(0, len(events), 100):
        r = await c.post("/v1/events", json=events[i : i + 100], headers=h)
        assert r.status_code == 202, r.text


async def create(c: httpx.AsyncClient, h: dict[str, str], spec: dict[str, Any]) -> None:
    r = await c.post("/v1/meters", json=spec, headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "active"


async def usage(c: httpx.AsyncClient, h: dict[str, str], slug: str) -> dict[str, Decimal]:
    params = {
        "from": (NOW - timedelta(days=1)).isoformat(),
        "to": (NOW + timedelta(days=1)).isoformat(),
        "group_by": "customer",
    }
    r = await c.get(f"/v1/meters/{slug}/usage", params=params, headers=h)
    assert r.status_code == 200, r.text
    return {row["customer"]: Decimal(str(row["value"])) for row in r.json()["data"]}


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The last offset of every partition (markers included)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "offsets-probe"})
    try:
        out = {}
        for p in range(PARTITIONS):
            _low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > 0:
                out[p] = high - 1
        return out
    finally:
        c.close()


async def backfill(c: httpx.AsyncClient, h: dict[str, str], slug: str) -> dict[str, Any]:
    r = await c.post(f"/v1/meters/{slug}/backfill", headers=h)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["state"] == "complete"
    return body


async def test_meter_created_while_the_worker_is_stopped(
    api: tuple[httpx.AsyncClient, dict[str, str]],
    broker: Any,
    topic: str,
    store: Store,
    unique: str,
    tmp_path: Path,
) -> None:
    c, h = api
    sink = ClickHouseSink(store)
    settings = worker_settings(broker.bootstrap, topic, f"grp-{unique}", tmp_path)
    ev = Events(seed=5)
    await create(c, h, COUNT)  # exists from the start: counts everything in the stream
    with Worker(settings, sink, tmp_path / "dedupe"):
        await send(c, h, ev.batch(300))
        wait_stored(sink, topic, end_offsets(broker.bootstrap, topic))
    # the worker is down: events before and after the meter's creation pile up in the topic
    await send(c, h, ev.batch(400, dup_rate=0.3))
    await create(c, h, GB)  # 201 although no worker has seen its markers
    await send(c, h, ev.batch(400, dup_rate=0.3))
    with Worker(settings, sink, tmp_path / "dedupe"):
        result = await backfill(c, h, "gb")  # waits until the worker has passed every marker
        await send(c, h, ev.batch(200, dup_rate=0.3))
        wait_stored(sink, topic, end_offsets(broker.bootstrap, topic))
    truth = ev.truth()
    assert await usage(c, h, "n") == truth["n"]
    assert await usage(c, h, "gb") == truth["gb"]
    assert 0 < result["events_scanned"] < len(ev.first)  # both sides really had a share
    r = await c.get("/v1/meters/gb/backfill", headers=h)
    (run,) = r.json()["data"]
    assert r.json()["visible_run"] == result["run_id"] and run["visible"]
    assert run["state"] == "complete" and run["events_scanned"] == result["events_scanned"]


async def test_marker_mid_stream_between_flushes_and_across_worker_restarts(
    api: tuple[httpx.AsyncClient, dict[str, str]],
    broker: Any,
    topic: str,
    store: Store,
    unique: str,
    tmp_path: Path,
) -> None:
    """Events flow the whole time; the meter is created in the middle of the stream (its markers
    land between flushes), then the worker is restarted gracefully, then killed without its final
    flush (replay from the store's progress, activation rebuilt from the activation rows)."""
    c, h = api
    sink = ClickHouseSink(store)
    settings = worker_settings(broker.bootstrap, topic, f"grp-{unique}", tmp_path)
    settings = settings.model_copy(update={"flush_interval_s": 0.05, "flush_max_events": 150})
    ev = Events(seed=9)
    w = Worker(settings, sink, tmp_path / "dedupe").start()

    async def flow(batches: int) -> None:
        for _ in range(batches):
            await send(c, h, ev.batch(60, dup_rate=0.25))

    try:
        await flow(5)
        await create(c, h, GB)
        await flow(5)
        w.stop()  # graceful restart
        await flow(3)  # piles up while stopped
        w = Worker(settings, sink, tmp_path / "dedupe").start()
        await flow(5)
        w.stop(flush=False)  # crash-like: what is buffered is neither stored nor acked
        await flow(3)
        w = Worker(settings, sink, tmp_path / "dedupe-lost").start()  # new machine: no index
        await flow(2)
        running = asyncio.create_task(backfill(c, h, "gb"))
        await flow(4)  # events keep coming while the backfill runs
        result = await running
        wait_stored(sink, topic, end_offsets(broker.bootstrap, topic))
    finally:
        if w.runner.running:
            w.stop()
    assert await usage(c, h, "gb") == ev.truth()["gb"]
    assert 0 < result["events_scanned"] < len(ev.first)
    # the activation rows: one per partition, the first marker's offset
    rows = store.query_rows(
        f"SELECT source_partition, count(), uniqExact(marker_offset) FROM "
        f"{store.database}.meter_activations FINAL GROUP BY source_partition ORDER BY 1"
    )
    assert [(int(p), int(n), int(u)) for p, n, u in rows] == [(p, 1, 1) for p in range(4)]
