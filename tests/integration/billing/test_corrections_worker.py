"""Event corrections end to end with the real pipeline: the API (meters with activation markers,
ingest, corrections, backfill, usage queries), a Tansu topic, the Faust worker and chDB.

Meter ``n`` exists from the start (the stream counts every event); ``gb`` (sum), ``peak`` (max)
and ``users`` (unique_count) are created while the worker is down, between two batches: batch A
is their history (a backfill run counts it), batch B their stream. Events of both sides are
voided and amended before the first backfill, between backfills, and a re-backfill follows. The
ground truth is computed from the events sent (the first copy of an id wins) and the
corrections made, never from Tally's code.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from api.app import create_app
from api.producer import EventProducer
from clickhouse.repo import Repo
from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store
from tally.settings import Settings, WaitMode
from tests.integration.streams.helpers import PARTITIONS, Worker, wait_stored, worker_settings
from tests.integration.streams.test_meter_activation import end_offsets

pytestmark = pytest.mark.anyio

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
METERS = {
    "n": {"slug": "n", "event_type": "upload", "aggregation": "count"},
    "gb": {"slug": "gb", "event_type": "upload", "aggregation": "sum", "value_property": "$.gb"},
    "peak": {
        "slug": "peak",
        "event_type": "upload",
        "aggregation": "max",
        "value_property": "$.gb",
    },
    "users": {
        "slug": "users",
        "event_type": "upload",
        "aggregation": "unique_count",
        "value_property": "$.user",
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Truth:
    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.first: dict[str, dict[str, Any]] = {}
        self.batch_of: dict[str, str] = {}
        self.fixes: dict[str, dict[str, Any] | None] = {}
        self.n = 0

    def batch(self, name: str, size: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(size):
            if self.first and self.rnd.random() < 0.2:  # a retry: same id, other payload
                eid = self.rnd.choice(list(self.first))
                customer = self.first[eid]["customer"]
            else:
                self.n += 1
                eid, customer = f"ev-{self.n}", f"c{self.rnd.randrange(3)}"
            ev = {
                "id": eid,
                "type": "upload",
                "customer": customer,
                "time": (
                    NOW
                    - timedelta(minutes=self.rnd.randrange(0, 30), seconds=self.rnd.randrange(60))
                )
                .isoformat()
                .replace("+00:00", "Z"),
                "properties": {
                    "gb": self.rnd.choice([self.rnd.randint(1, 90), "2.5"]),
                    "user": f"u{self.rnd.randrange(25)}",
                },
            }
            if eid not in self.first:
                self.first[eid] = ev
                self.batch_of[eid] = name
            out.append(ev)
        return out

    def props(self, eid: str) -> dict[str, Any] | None:
        return self.fixes.get(eid, self.first[eid]["properties"])

    def pick(self, batch: str) -> str:
        ids = [e for e, b in self.batch_of.items() if b == batch and self.props(e) is not None]
        return self.rnd.choice(sorted(ids))

    def values(self, slug: str, batches: set[str]) -> dict[str, Decimal]:
        per: dict[str, list[dict[str, Any]]] = {}
        for eid, ev in self.first.items():
            p = self.props(eid)
            if p is None or (slug != "n" and self.batch_of[eid] not in batches):
                continue
            per.setdefault(ev["customer"], []).append(p)
        out = {}
        for c, ps in per.items():
            gbs = [Decimal(str(p["gb"])) for p in ps]
            out[c] = {
                "n": Decimal(len(ps)),
                "gb": sum(gbs, Decimal(0)),
                "peak": max(gbs),
                "users": Decimal(len({p["user"] for p in ps})),
            }[slug]
        return out


@pytest.fixture
async def api(
    broker: Any, topic: str, store: Store
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    settings = Settings(
        kafka_bootstrap=broker.bootstrap,
        events_topic=topic,
        events_partitions=PARTITIONS,
        ingest_wait=WaitMode.BROKER,
        backfill_chunk_events=37,
        backfill_wait_s=60.0,
        billing_tasks=False,
        # far longer than the test: an answer right after a correction or a backfill proves
        # that the API process forgot what it had cached about the meter (not that it expired)
        meter_cache_ttl_s=300,
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


class Calls:
    """The test's requests to the API: POST (status checked), events in batches of 100, usage
    per customer of a meter over NOW +- 1 day."""

    def __init__(self, c: httpx.AsyncClient, h: dict[str, str]) -> None:
        self.c, self.h = c, h

    async def post(self, path: str, body: Any = None, status: int = 200) -> Any:
        r = await self.c.post(path, json=body, headers=self.h)
        assert r.status_code == status, r.text
        return r.json()

    async def send(self, events: list[dict[str, Any]]) -> None:
        for i in range(0, len(events), 100):
            await self.post("/v1/events", events[i : i + 100], 202)

    async def usage(self, slug: str) -> dict[str, Decimal]:
        params = {
            "from": (NOW - timedelta(days=1)).isoformat(),
            "to": (NOW + timedelta(days=1)).isoformat(),
            "group_by": "customer",
        }
        r = await self.c.get(f"/v1/meters/{slug}/usage", params=params, headers=self.h)
        assert r.status_code == 200, r.text
        return {row["customer"]: Decimal(str(row["value"])) for row in r.json()["data"]}


class Rig(NamedTuple):
    """What a test here drives: the API's requests, a worker's settings and sink, the topic."""

    calls: Calls
    settings: Any
    sink: ClickHouseSink
    bootstrap: str
    topic: str
    dedupe_dir: Path

    def worker(self) -> Worker:
        return Worker(self.settings, self.sink, self.dedupe_dir)

    def wait_stored(self) -> None:
        wait_stored(self.sink, self.topic, end_offsets(self.bootstrap, self.topic))


@pytest.fixture
def rig(
    api: tuple[httpx.AsyncClient, dict[str, str]],
    broker: Any,
    topic: str,
    store: Store,
    unique: str,
    tmp_path: Path,
) -> Rig:
    settings = worker_settings(broker.bootstrap, topic, f"grp-{unique}", tmp_path)
    return Rig(
        Calls(*api), settings, ClickHouseSink(store), broker.bootstrap, topic, tmp_path / "dedupe"
    )


async def test_void_and_amend_on_both_sides_then_rebackfill(rig: Rig) -> None:
    truth = Truth(seed=12)
    post, send, usage = rig.calls.post, rig.calls.send, rig.calls.usage

    async def correct(eid: str, **changes: Any) -> dict[str, Any]:
        if changes:
            props = {**truth.props(eid), **changes}  # type: ignore[dict-item]
            truth.fixes[eid] = props
            body = {"action": "amend", "properties": props, "reason": "test"}
        else:
            truth.fixes[eid] = None
            body = {"action": "void", "reason": "test"}
        out: dict[str, Any] = await post(f"/v1/events/{eid}/corrections", body, 201)
        return out

    async def check(batches: set[str]) -> None:
        for slug in METERS:
            assert await usage(slug) == truth.values(slug, batches), slug

    async def backfill_all() -> None:
        for slug in ("gb", "peak", "users"):
            body = await post(f"/v1/meters/{slug}/backfill")
            assert body["state"] == "complete"

    await post("/v1/meters", METERS["n"], 201)
    await send(truth.batch("A", 250))  # the worker is down: history for the later meters
    for slug in ("gb", "peak", "users"):
        await post("/v1/meters", METERS[slug], 201)
    await send(truth.batch("B", 250))
    with rig.worker():
        rig.wait_stored()
        await check({"B"})  # the stream's share of the late meters, all of n

        # stream-counted events of the late meters (batch B): a void, amends
        top = max(
            (e for e, b in truth.batch_of.items() if b == "B"),
            key=lambda e: Decimal(str(truth.first[e]["properties"]["gb"])),
        )
        cor = await correct(top)  # the peak itself
        assert {"meter": "peak", "origin": "stream"} in cor["targets"]
        await correct(truth.pick("B"), gb=1000)
        await correct(truth.pick("B"), user="u-new")
        # events no run counted yet (batch A): nothing taken away now
        cor = await correct(truth.pick("A"))
        assert {"meter": "gb", "origin": "backfill"} in cor["targets"]
        assert {"meter": "n", "origin": "stream"} in cor["targets"]
        await correct(truth.pick("A"), gb="0.5", user="u-amended")
        await check({"B"})

        await backfill_all()  # applies the batch-A corrections in its scan
        await check({"A", "B"})

        # events the visible run counted
        await correct(truth.pick("A"))
        await correct(truth.pick("A"), gb=5000)
        await correct(truth.pick("B"), gb="0.25")
        await check({"A", "B"})

        await backfill_all()  # a new run: every correction still counted once
        await check({"A", "B"})


async def test_a_backfill_through_the_api_shows_in_the_next_usage_query(rig: Rig) -> None:
    """The meter's entry said "the stream alone answers" (no run yet) and stays cached far
    longer than the test: the backfill through this process makes the very next query read the
    run."""
    truth = Truth(seed=5)
    post, send, usage = rig.calls.post, rig.calls.send, rig.calls.usage
    await post("/v1/meters", METERS["n"], 201)
    await send(truth.batch("A", 120))  # history of gb
    await post("/v1/meters", METERS["gb"], 201)
    await send(truth.batch("B", 120))
    with rig.worker():
        rig.wait_stored()
        assert await usage("gb") == truth.values("gb", {"B"})  # cached: stream only
        assert (await post("/v1/meters/gb/backfill"))["state"] == "complete"
        assert await usage("gb") == truth.values("gb", {"A", "B"})
