"""Every 4xx/5xx body of every router has the one shape {error, message, details: [{field,
message}]} (real app, store and broker). Representative failures of each router, plus the
framework's own (unknown route, wrong method, typed-parameter validation, unhandled error)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from api.app import create_app
from api.producer import EventProducer
from clickhouse.repo import Repo
from clickhouse.store import Store

from .conftest import ADMIN_TOKEN, auth, make_settings

pytestmark = pytest.mark.anyio
ADM = auth(ADMIN_TOKEN)


def check(
    r: httpx.Response, status: int, field: str | None = None, extra: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The one shape; ``extra``: keys a body may carry besides it (readiness diagnostics)."""
    assert r.status_code == status, (r.request.method, r.request.url.path, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = r.json()
    assert set(body) - extra == {"error", "message", "details"}, body
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], list)
    for d in body["details"]:
        assert isinstance(d["field"], str) and d["field"] and isinstance(d["message"], str), d
    if field is not None:
        assert field in [d["field"] for d in body["details"]], body
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    return body


async def test_every_router_answers_the_one_error_shape(
    broker: Any,
    topic: str,
    store: Any,
    repo: Repo,
    producer: EventProducer,
    tenant: tuple[str, str],
) -> None:
    tid, key = tenant
    h = auth(key)
    s = make_settings(broker, topic, metrics_token="m-token", max_inflight_events=40)
    app = create_app(s, store, producer=producer, progress_waiter=None, repo=repo)

    async def boom() -> None:
        raise RuntimeError("internal detail")

    async def typed(n: int) -> dict[str, int]:
        return {"n": n}

    app.add_api_route("/test/boom", boom)
    app.add_api_route("/test/typed", typed)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        # framework
        check(await c.get("/nope"), 404)
        check(await c.put("/v1/events", headers=h), 405)
        check(await c.get("/test/typed?n=x"), 400, "n")
        check(await c.get("/test/boom"), 500)
        # auth (every tenant router shares it)
        check(await c.get("/v1/meters"), 401, "authorization")
        check(await c.get("/v1/meters", headers={"Authorization": "Basic x"}), 401, "authorization")
        # ingest, native and CloudEvents
        check(await c.post("/v1/events", content=b"{nope", headers=h), 400, "body")
        check(
            await c.post("/v1/events", content=b"{}", headers={**h, "content-type": "text/plain"}),
            415,
        )
        check(await c.post("/v1/events", json=[{"id": "a"}], headers=h), 400, "type")
        check(await c.post("/v1/events?wait=forever", json=[], headers=h), 400, "wait")
        check(await c.post("/v1/events", content=b"x" * 40_000, headers=h), 413, "body")
        many = [{"id": f"m{i}", "type": "t", "customer": "c"} for i in range(45)]
        check(await c.post("/v1/events", json=many, headers=h), 503, "max_inflight_events")
        check(
            await c.post(
                "/api/v1/events",
                json={"id": "x"},
                headers={**h, "content-type": "application/cloudevents+json"},
            ),
            400,
        )
        # meters and usage (native and OpenMeter)
        check(await c.post("/v1/meters", json={"slug": "Bad Slug!"}, headers=h), 400)
        check(await c.get("/v1/meters/none", headers=h), 404, "slug")
        meter = {"slug": "calls", "event_type": "t", "aggregation": "count"}
        assert (await c.post("/v1/meters", json=meter, headers=h)).status_code == 201
        check(await c.post("/v1/meters", json=meter, headers=h), 409, "slug")
        check(await c.get("/v1/meters/calls/usage?window=YEAR", headers=h), 400, "window")
        check(await c.get("/v1/meters/none/usage", headers=h), 404, "slug")
        check(await c.get("/api/v1/meters/none", headers=h), 404)
        check(await c.post("/api/v1/meters/calls/query", json={"windowSize": 3}, headers=h), 400)
        # keys
        check(await c.get("/v1/api-keys/0000000000000000", headers=h), 404, "key_id")
        check(await c.post("/v1/api-keys", json={"name": 5}, headers=h), 400, "name")
        check(await c.post("/v1/api-keys", json=[1], headers=h), 400, "body")
        # catalog and rating
        check(await c.post("/v1/plans", json={"code": "p"}, headers=h), 400)
        check(await c.get("/v1/plans/none", headers=h), 404)
        check(await c.get("/v1/customers?limit=0", headers=h), 400, "limit")
        check(await c.get("/v1/customers/none", headers=h), 404)
        check(await c.post("/v1/subscriptions", json={}, headers=h), 400)
        check(await c.post("/v1/rating/preview", json={"price": {"model": "?"}}, headers=h), 400)
        # admin
        check(await c.get("/v1/admin/tenants", headers=h), 401, "authorization")
        check(await c.post("/v1/admin/tenants", json={"name": ""}, headers=ADM), 400, "name")
        check(await c.get("/v1/admin/tenants/zzzzzzzzzzzz/keys", headers=ADM), 404, "tenant_id")
        check(
            await c.put(
                f"/v1/admin/tenants/{tid}/limits", json={"monthly_events": -1}, headers=ADM
            ),
            400,
            "monthly_events",
        )
        check(await c.delete("/v1/admin/tokens/0000000000000000", headers=ADM), 404, "token_id")
        check(await c.post(f"/v1/admin/tenants/{tid}/meters/none/backfill", headers=ADM), 404)
        # health
        check(await c.get("/metrics"), 401, "authorization")
        # limits: 429 naming the limit
        r = await c.put(
            f"/v1/admin/tenants/{tid}/limits", json={"requests_per_second": 0.05}, headers=ADM
        )
        assert r.status_code == 200
        await c.get("/v1/meters", headers=h)
        check(await c.get("/v1/meters", headers=h), 429, "requests_per_second")


async def test_not_ready_is_the_one_shape_too(
    broker: Any, topic: str, chdb_dir: Any, unique: str, producer: EventProducer
) -> None:
    store = Store.open(f"chdb://{chdb_dir}", f"test_{unique}_ready")
    store.migrate()
    app = create_app(make_settings(broker, topic), store, producer=producer, progress_waiter=None)
    store.command(f"DROP DATABASE {store.database}")
    store.close()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/readyz")
    body = check(r, 503, "store", frozenset({"status", "checks", "components"}))
    assert body["error"] == "unavailable"
