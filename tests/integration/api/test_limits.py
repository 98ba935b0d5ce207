"""Per-tenant limits through the admin API and their enforcement on a real app, store and broker:
429 + Retry-After with the one error body naming the limit; nothing refused reaches the topic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from api.app import create_app
from api.producer import EventProducer
from clickhouse.repo import Repo

from .conftest import ADMIN_TOKEN, auth, consume_all, make_settings

pytestmark = pytest.mark.anyio
ADM = auth(ADMIN_TOKEN)


@asynccontextmanager
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as c:
        yield c


def events(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i}", "type": "t", "customer": "c"} for i in range(n)]


def limit_error(r: httpx.Response, status: int, field: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert set(body) == {"error", "message", "details"}
    assert [d["field"] for d in body["details"]] == [field]
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1
    return body


async def test_admin_sets_limits_and_validates_them(
    client: httpx.AsyncClient, tenant: tuple[str, str]
) -> None:
    tid = tenant[0]
    r = await client.get(f"/v1/admin/tenants/{tid}/limits", headers=ADM)
    assert r.status_code == 200
    body = r.json()
    assert body["overrides"] == {
        "requests_per_second": None,
        "events_per_second": None,
        "max_batch_events": None,
        "monthly_events": None,
    }
    assert body["effective"]["max_batch_events"] == 0  # only the request limits of each flavour
    r = await client.put(
        f"/v1/admin/tenants/{tid}/limits",
        json={"events_per_second": 0, "monthly_events": 1000},
        headers=ADM,
    )
    assert r.status_code == 200, r.text
    assert r.json()["effective"]["events_per_second"] == 0
    assert r.json()["effective"]["monthly_events"] == 1000
    for bad, field in (
        ({"requests_per_second": -1}, "requests_per_second"),
        ({"max_batch_events": -1}, "max_batch_events"),
        ({"monthly_events": "lots"}, "monthly_events"),
        ({"burst": 3}, "burst"),
    ):
        r = await client.put(f"/v1/admin/tenants/{tid}/limits", json=bad, headers=ADM)
        assert r.status_code == 400 and r.json()["details"][0]["field"] == field, r.text
    r = await client.put("/v1/admin/tenants/zzzzzzzzzzzz/limits", json={}, headers=ADM)
    assert r.status_code == 404
    r = await client.put(f"/v1/admin/tenants/{tid}/limits", json={}, headers=auth(tenant[1]))
    assert r.status_code == 401


async def test_rates_batch_and_quota_answer_429_naming_the_limit(
    broker: Any,
    topic: str,
    store: Any,
    repo: Repo,
    producer: EventProducer,
    tenant: tuple[str, str],
    other_tenant: tuple[str, str],
) -> None:
    tid, key = tenant
    s = make_settings(broker, topic, rate_limit_burst_s=1.0)
    app_a = create_app(s, store, producer=producer, progress_waiter=None, repo=repo)
    app_b = create_app(s, store, producer=producer, progress_waiter=None, repo=Repo(store))
    async with http(app_a) as a, http(app_b) as b:
        h = auth(key)
        # requests per second (rates this low make the test independent of the machine's speed:
        # a bucket of 1 refills in 20 s)
        r = await a.put(
            f"/v1/admin/tenants/{tid}/limits", json={"requests_per_second": 0.05}, headers=ADM
        )
        assert r.status_code == 200
        assert (await a.get("/v1/meters", headers=h)).status_code == 200
        body = limit_error(await a.get("/v1/meters", headers=h), 429, "requests_per_second")
        assert body["error"] == "rate_limited" and "0.05 requests per second" in body["message"]
        # the other tenant is not affected
        assert (await a.get("/v1/meters", headers=auth(other_tenant[1]))).status_code == 200

        # events per second (a bucket of 1: a batch of 10 passes and leaves it 9 in debt, which
        # takes 18 s to repay) and the per-tenant batch limit
        r = await a.put(
            f"/v1/admin/tenants/{tid}/limits",
            json={"events_per_second": 0.5, "max_batch_events": 20},
            headers=ADM,
        )
        assert r.status_code == 200
        limit_error(
            await a.post("/v1/events", json=events("big", 21), headers=h), 413, "max_batch_events"
        )
        r = await a.post("/v1/events", json=events("e1", 10), headers=h)
        assert r.status_code == 202, r.text
        limit_error(
            await a.post("/v1/events", json=events("e2", 5), headers=h), 429, "events_per_second"
        )

        # monthly quota: 25 accepted events per month (the 10 above count)
        await a.put(
            f"/v1/admin/tenants/{tid}/limits",
            json={"events_per_second": 0, "monthly_events": 25},
            headers=ADM,
        )
        r = await a.post("/v1/events", json=events("q1", 15), headers=h)
        assert r.status_code == 202, r.text
        body = limit_error(
            await a.post("/v1/events", json=events("q2", 1), headers=h), 429, "monthly_events"
        )
        assert body["error"] == "quota_exceeded" and "25 of 25" in body["message"]
        # process B learns the total from the store once A has flushed its counts
        await app_a.state.tally.flush_counters()
        limit_error(
            await b.post("/v1/events", json=events("q3", 1), headers=h), 429, "monthly_events"
        )
        # raising the quota lets events in again (at once in the process that changed it);
        # invalid events of a partly valid batch do not count
        await a.put(f"/v1/admin/tenants/{tid}/limits", json={"monthly_events": 30}, headers=ADM)
        r = await a.post(
            "/v1/events", json=[*events("q4", 4), {"id": "bad", "type": "t"}], headers=h
        )
        assert r.status_code == 200 and r.json()["accepted"] == 4, r.text
        limit_error(
            await a.post("/v1/events", json=events("q5", 2), headers=h), 429, "monthly_events"
        )
        r = await a.post("/v1/events", json=events("q6", 1), headers=h)
        assert r.status_code == 202, r.text
        await app_a.state.tally.flush_counters()
    got = consume_all(broker.bootstrap, topic, 30, timeout=10)
    ids = sorted(e.id for *_, env in got for e in env.events)
    assert len(ids) == 30
    assert {i.split("-")[0] for i in ids} == {"e1", "q1", "q4", "q6"}
    rows = store.query_rows(
        f"SELECT sum(events) FROM {store.database}.tenant_monthly_events "
        "WHERE tenant_id = {t:String}",
        {"t": tid},
    )
    assert rows[0][0] == 30


async def test_events_the_envelope_cannot_hold_take_the_event_rate_once(
    broker: Any,
    topic: str,
    store: Any,
    repo: Repo,
    producer: EventProducer,
    tenant: tuple[str, str],
) -> None:
    """A request with an event whose properties are nested too deep is redone without it; its
    other events take the tenant's event rate once (a bucket of 1 lets one batch into debt: a
    second charge for the same request would be refused)."""
    tid, key = tenant
    s = make_settings(broker, topic, rate_limit_burst_s=1.0)
    app = create_app(s, store, producer=producer, progress_waiter=None, repo=repo)
    async with http(app) as a:
        r = await a.put(
            f"/v1/admin/tenants/{tid}/limits", json={"events_per_second": 0.5}, headers=ADM
        )
        assert r.status_code == 200
        deep = b'{"k":' * 300 + b"1" + b"}" * 300
        body = b'[{"id":"d-0","type":"t","customer":"c"},{"id":"d-1","type":"t","customer":"c",'
        body += b'"properties":' + deep + b'},{"id":"d-2","type":"t","customer":"c"}]'
        r = await a.post(
            "/v1/events",
            content=body,
            headers={**auth(key), "content-type": "application/json"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 2
        assert [(e["index"], e["field"]) for e in r.json()["rejected"]] == [(1, "properties")]
        limit_error(
            await a.post("/v1/events", json=events("d2", 1), headers=auth(key)),
            429,
            "events_per_second",
        )
    got = consume_all(broker.bootstrap, topic, 2)
    assert sorted(e.id for *_, env in got for e in env.events) == ["d-0", "d-2"]
