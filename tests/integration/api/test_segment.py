"""Segment tracking API and webhook destination through the real app into a real Tansu topic."""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from cryptography.fernet import Fernet

from api.app import create_app
from api.producer import EventProducer
from api.topics import create_topic
from clickhouse.repo import Repo
from runtime.broker import BrokerProcess
from schemas.envelope import EnvelopeEvent
from tally.settings import Settings

from .conftest import auth, consume_all, make_settings

pytestmark = pytest.mark.anyio

SECRETS_KEY = Fernet.generate_key().decode()


@pytest.fixture
def seg_settings(broker: Any, topic: str) -> Settings:
    return make_settings(broker, topic, secrets_key=SECRETS_KEY)


@pytest.fixture
async def seg(
    seg_settings: Settings, store: Any, repo: Repo, producer: EventProducer
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(seg_settings, store, producer=producer, progress_waiter=None, repo=repo)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://tally"
    ) as c:
        yield c


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds")


def track(i: int, **kw: Any) -> dict[str, Any]:
    now = datetime.now(UTC) - timedelta(seconds=5)
    msg: dict[str, Any] = {
        "type": "track",
        "messageId": f"m{i}",
        "userId": f"user-{i % 3}",
        "event": "api.call",
        "properties": {"units": i},
        "timestamp": iso(now - timedelta(milliseconds=i)),
        "context": {"library": {"name": "test"}},
    }
    msg.update(kw)
    return {k: v for k, v in msg.items() if v is not None}


def on_topic(broker: Any, topic: str, n: int) -> dict[str, EnvelopeEvent]:
    return {e.id: e for *_, env in consume_all(broker.bootstrap, topic, n) for e in env.events}


def sign(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


# --- tracking API ------------------------------------------------------------------------------


async def test_batch_with_basic_auth_and_gzip_maps_messages_to_events(
    seg: httpx.AsyncClient, tenant: tuple[str, str], broker: Any, topic: str
) -> None:
    key = tenant[1]
    msgs = [track(i) for i in range(6)]
    msgs[1].pop("userId")
    msgs[1]["anonymousId"] = "anon-1"
    msgs += [
        {"type": "identify", "userId": "u", "traits": {"plan": "pro"}, "messageId": "i1"},
        {"type": "page", "userId": "u", "name": "Home", "messageId": "p1"},
        {"type": "screen", "userId": "u", "name": "Home", "messageId": "s1"},
        {"type": "group", "userId": "u", "groupId": "g", "messageId": "g1"},
        {"type": "alias", "userId": "u", "previousId": "x", "messageId": "a1"},
        {"type": "identify", "userId": "v", "messageId": "i2"},
    ]
    body = gzip.compress(orjson.dumps({"batch": msgs, "sentAt": iso(datetime.now(UTC))}))
    r = await seg.post(
        "/v1/batch",
        content=body,
        headers={
            **basic(key),
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
        },
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "accepted": 6, "ignored": 6, "rejected": []}
    got = on_topic(broker, topic, 6)
    assert sorted(got) == [f"m{i}" for i in range(6)]
    m3 = got["m3"]
    assert (m3.type, m3.customer, m3.properties) == ("api.call", "user-0", {"units": 3})
    want_ms = int(datetime.fromisoformat(msgs[3]["timestamp"]).timestamp() * 1000)
    assert m3.time_ms == want_ms
    assert got["m1"].customer == "anon-1"
    metrics = (await seg.get("/metrics")).text
    assert 'tally_segment_messages_ignored_total{type="identify"} 2.0' in metrics
    assert 'tally_segment_messages_ignored_total{type="alias"} 1.0' in metrics
    assert 'tally_ingest_events_total{outcome="accepted",source="segment"} 6.0' in metrics


async def test_write_key_in_body_bearer_and_refusals(
    seg: httpx.AsyncClient, tenant: tuple[str, str]
) -> None:
    key = tenant[1]
    ok = await seg.post("/v1/batch", json={"batch": [track(1)], "writeKey": key})
    assert ok.status_code == 200, ok.text
    ok = await seg.post("/v1/batch", json={"batch": [track(2)]}, headers=auth(key))
    assert ok.status_code == 200, ok.text
    ok = await seg.post("/v1/track", json={**track(3), "writeKey": key})
    assert ok.status_code == 200 and ok.json()["accepted"] == 1, ok.text
    for headers, body, needle in [
        ({}, {"batch": [track(1)]}, "missing write key"),
        (basic("tly_nope"), {"batch": [track(1)]}, "invalid API key"),
        ({}, {"batch": [track(1)], "writeKey": key + "x"}, "invalid API key"),
        ({"Authorization": "Basic %%%"}, {"batch": [track(1)]}, "malformed Basic"),
        ({"Authorization": "Digest abc"}, {"batch": [track(1)]}, "unsupported"),
    ]:
        r = await seg.post("/v1/batch", json=body, headers=headers)
        assert r.status_code == 401, r.text
        assert needle in r.json()["message"], r.text


async def test_bad_messages_are_listed_and_valid_neighbours_accepted(
    seg: httpx.AsyncClient, tenant: tuple[str, str], broker: Any, topic: str
) -> None:
    old = datetime.now(UTC) - timedelta(days=40)
    msgs = [
        track(0),
        track(1, messageId=None),
        track(2, event=None),
        track(3, type="purchase"),
        track(4, properties=[1, 2]),
        track(5, userId=None),
        track(6, timestamp=iso(old)),
        track(7, timestamp="yesterday"),
        "not an object",
        track(9, userId=True),
        track(10),
    ]
    r = await seg.post("/v1/batch", json={"batch": msgs}, headers=basic(tenant[1]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["accepted"] == 2 and body["ignored"] == 0
    fields = {(e["index"], e["field"]) for e in body["rejected"]}
    assert fields == {
        (1, "messageId"),
        (2, "event"),
        (3, "type"),
        (4, "properties"),
        (5, "userId"),
        (6, "timestamp"),
        (7, "timestamp"),
        (8, "message"),
        (9, "userId"),
    }
    late = next(e for e in body["rejected"] if e["index"] == 6)
    assert "lateness bound" in late["message"]
    assert sorted(on_topic(broker, topic, 2)) == ["m0", "m10"]
    # Nothing valid at all: 400 naming each problem (as Segment answers a bad request).
    r = await seg.post(
        "/v1/batch", json={"batch": [track(1, event=None)]}, headers=basic(tenant[1])
    )
    assert r.status_code == 400, r.text
    assert r.json()["details"] == [{"index": 0, "field": "event", "message": "event is required"}]


async def test_time_falls_back_to_original_timestamp_then_receive_time(
    seg: httpx.AsyncClient, tenant: tuple[str, str], broker: Any, topic: str
) -> None:
    orig = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    before = int(time.time() * 1000)
    msgs = [
        track(0, timestamp=None, originalTimestamp=iso(orig)),
        track(1, timestamp=None, originalTimestamp=None),
        track(2, timestamp=iso(orig + timedelta(minutes=1)), originalTimestamp=iso(orig)),
    ]
    r = await seg.post(
        "/v1/batch",
        json={"batch": msgs, "sentAt": iso(datetime.now(UTC))},
        headers=basic(tenant[1]),
    )
    after = int(time.time() * 1000)
    assert r.status_code == 200 and r.json()["accepted"] == 3, r.text
    got = on_topic(broker, topic, 3)
    assert got["m0"].time_ms == int(orig.timestamp() * 1000)
    assert before <= got["m1"].time_ms <= after
    assert got["m2"].time_ms == int(orig.timestamp() * 1000) + 60_000


async def test_segment_limits(
    seg: httpx.AsyncClient, tenant: tuple[str, str], broker: Any, topic: str
) -> None:
    h = {**basic(tenant[1]), "Content-Type": "application/json"}
    big = track(0, properties={"blob": "x" * (33 * 1024)})
    r = await seg.post("/v1/batch", json={"batch": [big, track(1)]}, headers=h)
    assert r.status_code == 200, r.text
    assert [(e["index"], e["field"]) for e in r.json()["rejected"]] == [(0, "message")]
    assert "32 KB" in r.json()["rejected"][0]["message"]
    r = await seg.post("/v1/track", json=big, headers=h)
    assert r.status_code == 400 and "32 KB" in r.json()["message"], r.text
    huge = {"batch": [track(i, properties={"blob": "y" * 20_000}) for i in range(30)]}
    r = await seg.post("/v1/batch", content=orjson.dumps(huge), headers=h)
    assert r.status_code == 400 and "500 KB" in r.json()["message"], r.text
    bomb = gzip.compress(b'{"batch": [' + b" " * (2 * 1024 * 1024) + b"]}")
    r = await seg.post("/v1/batch", content=bomb, headers={**h, "Content-Encoding": "gzip"})
    assert r.status_code == 400 and "500 KB" in r.json()["message"], r.text
    r = await seg.post("/v1/batch", content=b"nope", headers={**h, "Content-Encoding": "gzip"})
    assert r.status_code == 400 and "gzip" in r.json()["message"], r.text
    r = await seg.post("/v1/batch", content=b"{}", headers={**h, "Content-Encoding": "br"})
    assert r.status_code == 415, r.text
    many = [
        {"type": "track", "messageId": f"n{i}", "userId": "u", "event": "e"} for i in range(2501)
    ]
    r = await seg.post("/v1/batch", json={"batch": many}, headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 2500
    assert [(e["index"], e["field"]) for e in r.json()["rejected"]] == [(2500, "batch")]


async def test_customer_mapping_per_tenant(
    seg: httpx.AsyncClient,
    tenant: tuple[str, str],
    other_tenant: tuple[str, str],
    broker: Any,
    topic: str,
) -> None:
    key, other = tenant[1], other_tenant[1]
    r = await seg.put(
        "/v1/segment/config", json={"customer_property": "$.context.groupId"}, headers=auth(key)
    )
    assert r.status_code == 200, r.text
    assert r.json()["customer_property"] == "context.groupId"
    assert r.json()["fallback_to_user_id"] is False
    msgs = [
        track(0, context={"groupId": "acct-1"}),
        track(1),  # no groupId in the message: the batch-level context's
        track(2, context={"groupId": 77}),
    ]
    r = await seg.post(
        "/v1/batch",
        json={"batch": msgs, "context": {"groupId": "acct-batch"}},
        headers=basic(key),
    )
    assert r.status_code == 200 and r.json()["accepted"] == 3, r.text
    r = await seg.post("/v1/batch", json={"batch": [track(3)]}, headers=basic(key))
    assert r.status_code == 400, r.text
    assert r.json()["details"][0]["field"] == "context.groupId"
    # The other tenant is not affected: userId stays its customer.
    r = await seg.post("/v1/batch", json={"batch": [track(4)]}, headers=basic(other))
    assert r.status_code == 200, r.text
    # properties.account_id with fallback to the user
    r = await seg.put(
        "/v1/segment/config",
        json={"customer_property": "properties.account_id", "fallback_to_user_id": True},
        headers=auth(key),
    )
    assert r.status_code == 200, r.text
    r = await seg.post(
        "/v1/batch",
        json={"batch": [track(5, properties={"account_id": "acct-5"}), track(6)]},
        headers=basic(key),
    )
    assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
    got = on_topic(broker, topic, 6)
    assert {k: v.customer for k, v in got.items()} == {
        "m0": "acct-1",
        "m1": "acct-batch",
        "m2": "77",
        "m4": "user-1",
        "m5": "acct-5",
        "m6": "user-0",
    }
    r = await seg.get("/v1/segment/config", headers=auth(other))
    assert r.json()["customer_property"] is None
    for bad in ("context..x", "a b", "x" * 300, 5):
        r = await seg.put("/v1/segment/config", json={"customer_property": bad}, headers=auth(key))
        assert r.status_code == 400 and r.json()["details"][0]["field"] == "customer_property"


async def test_ignored_calls_and_fuzz_never_500(
    seg: httpx.AsyncClient, tenant: tuple[str, str]
) -> None:
    for kind in ("identify", "page", "screen", "group", "alias"):
        r = await seg.post(f"/v1/{kind}", json={"userId": "u"}, headers=basic(tenant[1]))
        assert r.status_code == 200 and r.json()["ignored"] == 1, r.text
    import random

    rnd = random.Random(3)
    atoms: list[Any] = [None, True, 0, 1.5, "", "x", [], {}, "2025-01-01T00:00:00Z", 2**70]
    keys = ["type", "messageId", "userId", "anonymousId", "event", "properties", "timestamp",
            "originalTimestamp", "context", "sentAt"]  # fmt: skip
    for _ in range(150):
        msgs = []
        for _ in range(rnd.randrange(1, 4)):
            m = {k: rnd.choice(atoms) for k in rnd.sample(keys, rnd.randrange(len(keys)))}
            if rnd.random() < 0.5:
                m["type"] = rnd.choice(["track", "identify", "TRACK", "x"])
            msgs.append(m if rnd.random() < 0.9 else rnd.choice(atoms))
        doc = rnd.choice([{"batch": msgs}, msgs, {"batch": rnd.choice(atoms)}, rnd.choice(atoms)])
        for path in ("/v1/batch", "/v1/track"):
            r = await seg.post(path, content=json.dumps(doc), headers=basic(tenant[1]))
            assert r.status_code in (200, 400), (path, doc, r.status_code, r.text)
            assert r.json().get("message") or r.json().get("success"), r.text


async def test_broker_down_is_503_with_retry_after(
    store: Any, repo: Repo, tenant: tuple[str, str], unique: str
) -> None:
    b = BrokerProcess().start()
    try:
        create_topic(b.bootstrap, f"sdown.{unique}", 2)
        producer = EventProducer(b.bootstrap, f"sdown.{unique}", timeout_s=2.0, retry_after_s=3)
        app = create_app(
            make_settings(b, f"sdown.{unique}", secrets_key=SECRETS_KEY),
            store,
            producer=producer,
            progress_waiter=None,
            repo=repo,
        )
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            r = await c.post("/v1/batch", json={"batch": [track(1)]}, headers=basic(tenant[1]))
            assert r.status_code == 200, r.text
            b.stop()
            r = await c.post("/v1/batch", json={"batch": [track(2)]}, headers=basic(tenant[1]))
            assert r.status_code == 503, r.text
            assert r.json()["error"] == "broker_unavailable"
            assert r.headers["retry-after"] == "3"
        producer.close(0.5)
    finally:
        b.stop()


# --- webhook destination -----------------------------------------------------------------------


async def test_webhook_signature_rotation_and_scoping(
    seg: httpx.AsyncClient,
    tenant: tuple[str, str],
    other_tenant: tuple[str, str],
    broker: Any,
    topic: str,
    store: Any,
) -> None:
    (tenant_id, key), (other_id, other_key) = tenant, other_tenant
    path = f"/v1/segment/webhook/{tenant_id}"
    body = orjson.dumps(track(1, messageId="w1"))
    r = await seg.post(path, content=body, headers={"X-Signature": sign("whatever" * 3, body)})
    assert r.status_code == 401 and "not enabled" in r.json()["message"], r.text

    r = await seg.post("/v1/segment/webhook-secret", content=b" ", headers=auth(key))
    assert r.status_code == 400, r.text  # whitespace is not "no body"
    assert [d["field"] for d in r.json()["details"]] == ["body"], r.text
    r = await seg.post("/v1/segment/webhook-secret", headers=auth(key))
    assert r.status_code == 200, r.text
    first = r.json()["secret"]
    assert len(first) >= 32 and r.json()["webhook"]["enabled"] is True
    assert r.json()["webhook"]["path"] == path
    cfg = await seg.get("/v1/segment/config", headers=auth(key))
    assert first not in cfg.text and cfg.json()["webhook"]["enabled"] is True

    r = await seg.post(path, content=body, headers={"X-Signature": sign(first, body)})
    assert r.status_code == 200, r.text
    assert r.json() == {"success": True, "accepted": 1, "ignored": 0, "rejected": []}
    r = await seg.post(path, content=body, headers={"X-Signature": sign(first, body).upper()})
    assert r.status_code == 200, r.text  # a replay: same messageId, deduplicated downstream
    for headers, needle in [
        ({}, "missing X-Signature"),
        ({"X-Signature": sign(first, body + b" ")}, "does not match"),
        ({"X-Signature": "zz"}, "does not match"),
        ({"X-Signature": "é".encode("latin-1")}, "does not match"),
    ]:
        r = await seg.post(path, content=body, headers=headers)
        assert r.status_code == 401 and needle in r.json()["message"], r.text
    # The other tenant's URL does not take this tenant's secret.
    r = await seg.post(f"/v1/segment/webhook/{other_id}", content=body, headers={
        "X-Signature": sign(first, body)})  # fmt: skip
    assert r.status_code == 401, r.text

    # Rotation with a grace period: both verify; then with none: only the newest.
    r = await seg.post(
        "/v1/segment/webhook-secret",
        json={"secret": "a-chosen-secret-0123456789"},
        headers=auth(key),
    )
    assert r.status_code == 200 and r.json()["secret"] is None, r.text
    assert r.json()["webhook"]["previous_secret_valid_until"] is not None
    b2 = orjson.dumps(track(2, messageId="w2"))
    for secret in (first, "a-chosen-secret-0123456789"):
        r = await seg.post(path, content=b2, headers={"X-Signature": sign(secret, b2)})
        assert r.status_code == 200, (secret, r.text)
    r = await seg.post(
        "/v1/segment/webhook-secret",
        json={"secret": "the-third-secret-0123456789", "previous_valid_for_s": 0},
        headers=auth(key),
    )
    assert r.status_code == 200 and r.json()["webhook"]["previous_secret_valid_until"] is None
    r = await seg.post(
        path, content=b2, headers={"X-Signature": sign("a-chosen-secret-0123456789", b2)}
    )
    assert r.status_code == 401, r.text
    r = await seg.post(
        path, content=b2, headers={"X-Signature": sign("the-third-secret-0123456789", b2)}
    )
    assert r.status_code == 200, r.text

    # Stored sealed: the plaintext is nowhere in the table, the server key opens it.
    rows = store.query_rows(
        f"SELECT secret_sealed, previous_sealed FROM {store.database}.segment_settings"
    )
    dump = repr(rows)
    for plain in (first, "a-chosen-secret-0123456789", "the-third-secret-0123456789"):
        assert plain not in dump
    latest = store.query_rows(
        f"SELECT secret_sealed FROM {store.database}.segment_settings FINAL "
        "WHERE tenant_id = {t:String}",
        {"t": tenant_id},
    )[0][0]
    assert Fernet(SECRETS_KEY.encode()).decrypt(latest.encode()) == b"the-third-secret-0123456789"

    # Invalid input is 400 naming the field; disabling stops every secret.
    r = await seg.post("/v1/segment/webhook-secret", json={"secret": "short"}, headers=auth(key))
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "secret", r.text
    r = await seg.delete("/v1/segment/webhook-secret", headers=auth(key))
    assert r.status_code == 204
    r = await seg.post(
        path, content=b2, headers={"X-Signature": sign("the-third-secret-0123456789", b2)}
    )
    assert r.status_code == 401 and "not enabled" in r.json()["message"], r.text

    got = on_topic(broker, topic, 5)
    assert set(got) == {"w1", "w2"} and got["w1"].customer == "user-1"
    metrics = (await seg.get("/metrics")).text
    assert 'tally_segment_webhook_refused_total{reason="bad_signature"}' in metrics
    assert other_key  # the other tenant exists and was refused above


async def test_webhook_secret_needs_a_secrets_key(
    settings: Settings, store: Any, repo: Repo, producer: EventProducer, tenant: tuple[str, str]
) -> None:
    app = create_app(settings, store, producer=producer, progress_waiter=None, repo=repo)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/segment/webhook-secret", headers=auth(tenant[1]))
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "not_configured"
        assert "TALLY_SECRETS_KEY" in r.json()["message"]
