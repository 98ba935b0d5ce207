"""Meters, admin and health endpoints against a real chDB; tenant isolation."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from api.app import create_app
from api.meters_file import load_meters_file
from schemas.control import decode_control, is_control
from tally.errors import Conflict, ValidationError

from .conftest import ADMIN_TOKEN, auth

pytestmark = pytest.mark.anyio

TOKENS = {
    "slug": "tokens",
    "eventType": "llm",
    "aggregation": "SUM",
    "valueProperty": "$.tokens",
    "groupBy": {"model": "$.model"},
}


async def test_meter_crud(client: httpx.AsyncClient, tenant: tuple[str, str]) -> None:
    h = auth(tenant[1])
    r = await client.post("/v1/meters", json=TOKENS, headers=h)
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["slug"] == "tokens" and m["aggregation"] == "sum" and m["tenant_id"] == tenant[0]
    assert m["group_by"] == {"model": "$.model"} and m["created_at"].endswith("Z")
    r = await client.post("/v1/meters", json=TOKENS, headers=h)
    assert r.status_code == 409 and "tokens" in r.json()["message"]
    r = await client.get("/v1/meters", headers=h)
    assert [x["slug"] for x in r.json()["data"]] == ["tokens"]
    r = await client.get("/v1/meters/tokens", headers=h)
    assert r.status_code == 200 and r.json()["id"] == m["id"]
    # OpenMeter read forms
    r = await client.get("/api/v1/meters", headers=h)
    assert r.status_code == 200
    (om,) = r.json()
    assert om["slug"] == "tokens" and om["aggregation"] == "SUM"
    assert om["eventType"] == "llm" and om["valueProperty"] == "$.tokens"
    assert om["groupBy"] == {"model": "$.model"} and om["windowSize"] == "MINUTE"
    r = await client.get("/api/v1/meters/tokens", headers=h)
    assert r.json() == om
    # a usage query keeps the meter (api.meterlookup); a delete through this process drops it
    r = await client.get("/v1/meters/tokens/usage", headers=h)
    assert r.status_code == 200 and r.json()["aggregation"] == "sum"
    r = await client.delete("/v1/meters/tokens", headers=h)
    assert r.status_code == 204
    r = await client.get("/v1/meters/tokens", headers=h)
    assert r.status_code == 404 and "tokens" in r.json()["message"]
    for path in ("/v1/meters/tokens/usage", "/api/v1/meters/tokens/query"):
        r = await client.get(path, headers=h)
        assert r.status_code == 404 and "tokens" in r.json()["message"], (path, r.text)
    r = await client.delete("/v1/meters/tokens", headers=h)
    assert r.status_code == 404
    # the slug again, another definition: usage queries use the new one at once
    r = await client.post("/v1/meters", json={**TOKENS, "aggregation": "MAX"}, headers=h)
    assert r.status_code == 201, r.text
    r = await client.get("/v1/meters/tokens/usage", headers=h)
    assert r.status_code == 200 and r.json()["aggregation"] == "max"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({**TOKENS, "slug": "Bad Slug"}, "slug"),
        ({**TOKENS, "aggregation": "MEDIAN"}, "aggregation"),
        ({k: v for k, v in TOKENS.items() if k != "valueProperty"}, "value_property"),
        ({**TOKENS, "valueProperty": "tokens"}, "JSONPath"),
        ({**TOKENS, "colour": "red"}, "colour"),
        ([TOKENS], "JSON object"),
    ],
)
async def test_meter_validation_400(
    client: httpx.AsyncClient, tenant: tuple[str, str], body: Any, needle: str
) -> None:
    r = await client.post("/v1/meters", json=body, headers=auth(tenant[1]))
    assert r.status_code == 400, r.text
    assert needle in r.json()["message"]


async def test_malformed_meter_json(client: httpx.AsyncClient, tenant: tuple[str, str]) -> None:
    r = await client.post(
        "/v1/meters",
        content=b"{slug:",
        headers={**auth(tenant[1]), "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["message"]


async def test_cross_tenant_isolation(
    client: httpx.AsyncClient, tenant: tuple[str, str], other_tenant: tuple[str, str]
) -> None:
    r = await client.post("/v1/meters", json=TOKENS, headers=auth(tenant[1]))
    assert r.status_code == 201
    hb = auth(other_tenant[1])
    for path in (
        "/v1/meters/tokens",
        "/api/v1/meters/tokens",
        "/v1/meters/tokens/usage",
        "/api/v1/meters/tokens/query",
    ):
        r = await client.get(path, headers=hb)
        assert r.status_code == 404, (path, r.text)
        assert "tokens" in r.json()["message"]
    assert (await client.get("/v1/meters", headers=hb)).json() == {"data": []}
    assert (await client.delete("/v1/meters/tokens", headers=hb)).status_code == 404
    # B may create its own meter with the same slug; A's is untouched
    assert (await client.post("/v1/meters", json=TOKENS, headers=hb)).status_code == 201
    ra = await client.get("/v1/meters/tokens", headers=auth(tenant[1]))
    rb = await client.get("/v1/meters/tokens", headers=hb)
    assert ra.json()["tenant_id"] == tenant[0] and rb.json()["tenant_id"] == other_tenant[0]
    assert ra.json()["id"] != rb.json()["id"]


async def test_admin(client: httpx.AsyncClient) -> None:
    adm = auth(ADMIN_TOKEN)
    r = await client.post("/v1/admin/tenants", json={"name": "initech"}, headers=adm)
    assert r.status_code == 201, r.text
    body = r.json()
    tenant_id, key = body["tenant_id"], body["api_key"]
    assert body["name"] == "initech" and key.startswith("tly_")
    # the new key works
    r = await client.get("/v1/meters", headers=auth(key))
    assert r.status_code == 200
    r = await client.get("/v1/admin/tenants", headers=adm)
    assert tenant_id in [t["tenant_id"] for t in r.json()["data"]]
    assert "api_key" not in r.text
    r = await client.post(f"/v1/admin/tenants/{tenant_id}/keys", headers=adm)
    assert r.status_code == 201 and r.json()["api_key"] != key
    r2 = await client.get("/v1/meters", headers=auth(r.json()["api_key"]))
    assert r2.status_code == 200
    r = await client.post("/v1/admin/tenants/nosuchtenant/keys", headers=adm)
    assert r.status_code == 404 and "nosuchtenant" in r.json()["message"]
    # bad bodies
    for bad in ({}, {"name": ""}, {"name": 5}, ["x"]):
        r = await client.post("/v1/admin/tenants", json=bad, headers=adm)
        assert r.status_code == 400 and "name" in r.json()["message"]
    # a tenant API key is not the admin token
    r = await client.get("/v1/admin/tenants", headers=auth(key))
    assert r.status_code == 401 and "admin token" in r.json()["message"]
    r = await client.get("/v1/admin/tenants")
    assert r.status_code == 401 and "missing Authorization" in r.json()["message"]


async def test_health_metrics_and_unknown_routes(
    client: httpx.AsyncClient, tenant: tuple[str, str]
) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["checks"] == {"store": "ok", "migrations": "ok", "broker": "ok"}
    await client.post("/v1/events", json=[{"id": "1"}], headers=auth(tenant[1]))
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert 'tally_ingest_events_total{outcome="rejected",source="native"} 1.0' in r.text
    assert 'tally_ingest_rejected_events_total{reason="type",source="native"} 1.0' in r.text
    assert 'route="/v1/events",status="400"' in r.text
    r = await client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = await client.put("/v1/events", headers=auth(tenant[1]))
    assert r.status_code == 405 and r.json()["message"]


async def test_meters_file(
    settings: Any, store: Any, repo: Any, producer: Any, tenant: tuple[str, str], tmp_path: Path
) -> None:
    tenant_id = tenant[0]
    st = create_app(settings, store, producer=producer, progress_waiter=None, repo=repo).state.tally
    f = tmp_path / "meters.yaml"
    f.write_text(
        f"tenants:\n  {tenant_id}:\n    meters:\n"
        "      - {slug: calls, eventType: api_call, aggregation: COUNT}\n"
        "      - {slug: tokens, eventType: llm, aggregation: SUM, valueProperty: $.tokens}\n"
    )
    assert await load_meters_file(st, f) == [f"{tenant_id}/calls", f"{tenant_id}/tokens"]
    assert await load_meters_file(st, f) == []  # idempotent
    meters = repo.list_meters(tenant_id)
    assert [m.slug for m in meters] == ["calls", "tokens"]
    assert {(m.status, m.activation_topic) for m in meters} == {("active", producer.topic)}
    f.write_text(
        f"tenant: {tenant_id}\nmeters:\n  - {{slug: calls, eventType: other, aggregation: COUNT}}\n"
    )
    with pytest.raises(Conflict, match="calls"):
        await load_meters_file(st, f)
    f.write_text("tenant: nosuchtenant\nmeters: []\n")
    with pytest.raises(ValidationError, match="nosuchtenant"):
        await load_meters_file(st, f)


async def test_lifespan_loads_meters_file(
    settings: Any, store: Any, repo: Any, producer: Any, tenant: tuple[str, str], tmp_path: Path
) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(
        f"tenant: {tenant[0]}\nmeters:\n  - {{slug: c, eventType: e, aggregation: COUNT}}\n"
    )
    s = settings.model_copy(update={"meters_file": f, "admin_token": "another-admin-token-xyz"})
    app = create_app(s, store, producer=producer, progress_waiter=None, repo=repo)
    async with app.router.lifespan_context(app):
        assert [m.slug for m in repo.list_meters(tenant[0])] == ["c"]
        assert repo.check_admin_token("another-admin-token-xyz")


def read_markers(bootstrap: str, topic: str, want: int, timeout: float = 20) -> list[Any]:
    """Every control message of the topic as (partition, offset, Control), read from the start
    until ``want`` were seen (event envelopes are skipped)."""
    import time

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"markers-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(out) < want and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None or msg.error() or not is_control(msg.value()):
                continue
            out.append((msg.partition(), msg.offset(), decode_control(msg.value())))
        return out
    finally:
        c.close()


async def test_create_produces_a_marker_to_every_partition_then_answers(
    client: httpx.AsyncClient, tenant: tuple[str, str], repo: Any, broker: Any, topic: str
) -> None:
    r = await client.post("/v1/meters", json=TOKENS, headers=auth(tenant[1]))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "active" and "activation_topic" not in body
    stored = repo.get_meter(tenant[0], "tokens")
    assert stored.status == "active" and stored.activation_topic == topic
    markers = read_markers(broker.bootstrap, topic, 4)
    assert sorted(p for p, _o, _c in markers) == [0, 1, 2, 3]  # every partition, once
    for _p, _o, control in markers:
        assert control.meter.id == body["id"] and control.meter.activation_topic == topic
        assert control.meter.spec() == stored.spec()


async def test_create_with_broker_down_stays_pending_and_a_resend_finishes_it(
    settings: Any,
    store: Any,
    repo: Any,
    client: httpx.AsyncClient,
    tenant: tuple[str, str],
    broker: Any,
    topic: str,
) -> None:
    from api.producer import EventProducer
    from runtime.broker import free_port

    dead = EventProducer(
        f"127.0.0.1:{free_port()}", topic, timeout_s=1.0, retry_after_s=4, partitions=4
    )
    app = create_app(settings, store, producer=dead, progress_waiter=None, repo=repo)
    h = auth(tenant[1])
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            r = await c.post("/v1/meters", json=TOKENS, headers=h)
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "broker_unavailable" and r.headers["retry-after"] == "4"
    finally:
        dead.close(0.1)
    pending = repo.get_meter(tenant[0], "tokens")
    assert pending.status == "pending"
    r = await client.get("/v1/meters/tokens", headers=h)
    assert r.json()["status"] == "pending"
    # a different definition is still a conflict while pending
    r = await client.post("/v1/meters", json={**TOKENS, "aggregation": "MAX"}, headers=h)
    assert r.status_code == 409 and "different definition" in r.json()["message"]
    assert r.json()["details"] == [
        {"field": "slug", "message": "exists with a different definition"}
    ]
    # the same request again, with the broker up: markers produced, meter active, same id
    r = await client.post("/v1/meters", json=TOKENS, headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["id"] == pending.id and r.json()["status"] == "active"
    assert sorted(p for p, _o, _c in read_markers(broker.bootstrap, topic, 4)) == [0, 1, 2, 3]
    r = await client.post("/v1/meters", json=TOKENS, headers=h)
    assert r.status_code == 409 and "already exists" in r.json()["message"]
