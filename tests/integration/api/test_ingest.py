"""Ingest through the real app into a real Tansu topic; bad input never gives a 500."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import orjson
import pytest

from api.app import create_app
from api.producer import EventProducer
from api.topics import create_topic
from runtime.broker import BrokerProcess
from schemas.envelope import partition_for
from streams.progress import ProgressBoard

from .conftest import auth, consume_all, make_settings

pytestmark = pytest.mark.anyio


def events(n: int, prefix: str = "e", **kw: Any) -> list[dict[str, Any]]:
    now_ms = int(time.time() * 1000)
    return [
        {
            "id": f"{prefix}{i}",
            "type": "api_call",
            "customer": f"c{i % 3}",
            "time": now_ms - 1000 - i,
            "properties": {"n": i},
            **kw,
        }
        for i in range(n)
    ]


def assert_error(r: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["error"] and body["message"]
    for n in needles:
        assert n in r.text, (n, r.text)
    return body


async def test_batch_reaches_topic_in_envelopes(
    client: httpx.AsyncClient, tenant: tuple[str, str], broker: Any, topic: str
) -> None:
    tenant_id, key = tenant
    batch = events(20)
    r = await client.post("/v1/events", json=batch, headers=auth(key))
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": 20, "rejected": []}
    got = consume_all(broker.bootstrap, topic, 20)
    ids = []
    for partition, _offset, msg_key, env in got:
        assert msg_key == tenant_id.encode()
        assert env.tenant_id == tenant_id
        for e in env.events:
            assert partition_for(tenant_id, e.id, 4) == partition
            ids.append(e.id)
    assert sorted(ids) == sorted(e["id"] for e in batch)
    by_id = {e.id: e for _, _, _, env in got for e in env.events}
    assert by_id["e3"].time_ms == batch[3]["time"]
    assert by_id["e3"].properties == {"n": 3}
    assert by_id["e3"].customer == "c0"


async def test_single_event_object(client: httpx.AsyncClient, tenant: tuple[str, str]) -> None:
    r = await client.post("/v1/events", json=events(1)[0], headers=auth(tenant[1]))
    assert r.status_code == 202 and r.json()["accepted"] == 1


async def test_mixed_batch_accepts_valid_neighbours(
    client: httpx.AsyncClient, tenant: tuple[str, str], broker: Any, topic: str
) -> None:
    batch = events(4)
    del batch[1]["id"]
    batch[2]["time"] = "not a time"
    r = await client.post("/v1/events", json=batch, headers=auth(tenant[1]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 2
    assert {(e["index"], e["field"]) for e in body["rejected"]} == {(1, "id"), (2, "time")}
    got = consume_all(broker.bootstrap, topic, 2)
    assert sorted(e.id for *_, env in got for e in env.events) == ["e0", "e3"]


async def test_properties_the_envelope_cannot_hold(
    client: httpx.AsyncClient, tenant: tuple[str, str], broker: Any, topic: str
) -> None:
    """Properties nested too deep are rejected by name, their neighbours delivered; an integer
    beyond 64 bits is accepted as the number orjson reads (a float), as before the one-call
    decoder, which reads it exactly and leaves such a body to the general path."""
    props = [b"{}", b'{"k":' * 300 + b"1" + b"}" * 300, b'{"big":1180591620717411303424}']
    raw = b"[%s]" % b",".join(
        orjson.dumps({k: v for k, v in e.items() if k != "properties"})[:-1]
        + b',"properties":'
        + p
        + b"}"
        for e, p in zip(events(3), props, strict=True)
    )
    r = await client.post(
        "/v1/events", content=raw, headers={**auth(tenant[1]), "content-type": "application/json"}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "accepted": 2,
        "rejected": [
            {
                "index": 1,
                "field": "properties",
                "message": "properties are nested more than 251 levels deep",
            }
        ],
    }
    got = consume_all(broker.bootstrap, topic, 2)
    by_id = {e.id: e for *_, env in got for e in env.events}
    assert sorted(by_id) == ["e0", "e2"]
    assert by_id["e2"].properties == {"big": float(2**70)}


async def test_atomic_rejects_all(client: httpx.AsyncClient, tenant: tuple[str, str]) -> None:
    batch = events(3)
    batch[2]["customer"] = 7
    r = await client.post("/v1/events?atomic=true", json=batch, headers=auth(tenant[1]))
    body = assert_error(r, 400, "atomic", "customer")
    assert body["details"] == [
        {"index": 2, "field": "customer", "message": "customer must be a string, got number"}
    ]


async def test_all_invalid_is_400_listing_each(
    client: httpx.AsyncClient, tenant: tuple[str, str]
) -> None:
    r = await client.post("/v1/events", json=[{"id": "x"}, 5], headers=auth(tenant[1]))
    body = assert_error(r, 400, "type", "customer")
    assert {(d["index"], d["field"]) for d in body["details"]} == {
        (0, "type"),
        (0, "customer"),
        (1, "event"),
    }


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"id": "a", ', "not valid JSON"),
        (b"", "empty"),
        (b"[]", "empty"),
        (b"42", "must be"),
        (b'"str"', "must be"),
        (b'[{"id": "a", "type": "t", "customer": "c", "time": "2020-13-45T00:00:00Z"}]', "time"),
        (b'[{"id": ["a"], "type": "t", "customer": "c"}]', "id"),
        (b'[{"id": "a", "type": "t", "customer": "c", "properties": "x"}]', "properties"),
        (b'[{"id": "a", "type": "t", "customer": "c", "extra": 1}]', "extra"),
        (b"\xff\xfe garbage", "JSON"),
    ],
)
async def test_bad_input_is_400_naming_problem(
    client: httpx.AsyncClient, tenant: tuple[str, str], content: bytes, needle: str
) -> None:
    r = await client.post(
        "/v1/events",
        content=content,
        headers={**auth(tenant[1]), "Content-Type": "application/json"},
    )
    assert_error(r, 400, needle)


async def test_lateness_bound(client: httpx.AsyncClient, tenant: tuple[str, str]) -> None:
    old = int(time.time() * 1000) - 36 * 86_400_000
    future = "2999-01-01T00:00:00Z"
    r = await client.post(
        "/v1/events",
        json=events(1, time=old) + events(1, prefix="f", time=future),
        headers=auth(tenant[1]),
    )
    body = assert_error(r, 400, "lateness bound", "future")
    assert [(d["index"], d["field"]) for d in body["details"]] == [(0, "time"), (1, "time")]


async def test_too_many_events_413(client: httpx.AsyncClient, tenant: tuple[str, str]) -> None:
    r = await client.post("/v1/events", json=events(51), headers=auth(tenant[1]))
    assert_error(r, 413, "51 events", "limit is 50")


async def test_too_many_bytes_413_by_content_length(
    client: httpx.AsyncClient, tenant: tuple[str, str]
) -> None:
    big = events(1, properties={"pad": "x" * 40_000})
    r = await client.post("/v1/events", json=big, headers=auth(tenant[1]))
    assert_error(r, 413, "limit is 32768 bytes (max_request_bytes)")


async def test_too_many_bytes_413_while_streaming(
    client: httpx.AsyncClient, tenant: tuple[str, str]
) -> None:
    """No Content-Length (chunked): the limit is enforced on the bytes actually read."""

    async def body() -> Any:
        for _ in range(10):
            yield b" " * 8192

    r = await client.post(
        "/v1/events",
        content=body(),
        headers={**auth(tenant[1]), "Content-Type": "application/json"},
    )
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "at least", "limit is 32768 bytes")


async def test_bad_query_params(client: httpx.AsyncClient, tenant: tuple[str, str]) -> None:
    r = await client.post("/v1/events?wait=soon", json=events(1), headers=auth(tenant[1]))
    assert_error(r, 400, "wait")
    r = await client.post("/v1/events?atomic=maybe", json=events(1), headers=auth(tenant[1]))
    assert_error(r, 400, "atomic")
    r = await client.post("/v1/events?wait=stored", json=events(1), headers=auth(tenant[1]))
    assert_error(r, 400, "wait=stored")  # this app has no progress source


async def test_unsupported_content_type(client: httpx.AsyncClient, tenant: tuple[str, str]) -> None:
    r = await client.post(
        "/v1/events",
        content=b"id=1",
        headers={**auth(tenant[1]), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_error(r, 415, "Content-Type")


@pytest.mark.parametrize(
    ("headers", "needle"),
    [
        ({}, "missing Authorization"),
        ({"Authorization": "Basic abc"}, "Bearer"),
        ({"Authorization": "Bearer "}, "Bearer"),
        ({"Authorization": "Bearer tly_nope_nope"}, "invalid API key"),
        ({"Authorization": f"Bearer {'x' * 5000}"}, "invalid API key"),
    ],
)
async def test_bad_auth_401(
    client: httpx.AsyncClient, headers: dict[str, str], needle: str
) -> None:
    r = await client.post("/v1/events", json=events(1), headers=headers)
    body = assert_error(r, 401, needle)
    assert body["error"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"


async def test_admin_token_is_not_an_api_key(client: httpx.AsyncClient) -> None:
    from .conftest import ADMIN_TOKEN

    r = await client.post("/v1/events", json=events(1), headers=auth(ADMIN_TOKEN))
    assert_error(r, 401, "invalid API key")


async def test_cloudevents_content_types(
    client: httpx.AsyncClient, tenant: tuple[str, str], broker: Any, topic: str
) -> None:
    def ce(i: int) -> dict[str, Any]:
        return {
            "id": f"ce{i}",
            "source": "test",
            "specversion": "1.0",
            "type": "api_call",
            "subject": "cust-1",
            "time": "2030-01-01T00:00:00Z" if i < 0 else None,
            "data": {"tokens": i},
        }

    h = auth(tenant[1])
    one = orjson.dumps(ce(1))
    r = await client.post(
        "/api/v1/events",
        content=one,
        headers={**h, "Content-Type": "application/cloudevents+json"},
    )
    assert r.status_code == 204 and r.content == b""
    r = await client.post(
        "/api/v1/events",
        content=orjson.dumps([ce(2), ce(3)]),
        headers={**h, "Content-Type": "application/cloudevents-batch+json"},
    )
    assert r.status_code == 204, r.text
    r = await client.post("/api/v1/events", json=[ce(4)], headers=h)
    assert r.status_code == 204, r.text
    # wrong shape for the content type
    r = await client.post(
        "/api/v1/events",
        content=orjson.dumps([ce(5)]),
        headers={**h, "Content-Type": "application/cloudevents+json"},
    )
    assert_error(r, 400, "one event object")
    r = await client.post(
        "/api/v1/events", content=one, headers={**h, "Content-Type": "text/plain"}
    )
    assert_error(r, 415, "text/plain")
    bad = ce(6)
    del bad["subject"]
    r = await client.post("/api/v1/events", json=[bad, ce(7)], headers=h)
    assert r.status_code == 200 and r.json()["rejected"][0]["field"] == "subject"
    got = consume_all(broker.bootstrap, topic, 5)
    evs = {e.id: e for *_, env in got for e in env.events}
    assert sorted(evs) == ["ce1", "ce2", "ce3", "ce4", "ce7"]
    assert evs["ce2"].customer == "cust-1" and evs["ce2"].properties == {"tokens": 2}


async def test_wait_stored(
    broker: Any, topic: str, store: Any, repo: Any, producer: EventProducer, tenant: Any
) -> None:
    """wait=stored answers after the worker's progress reaches every envelope; 503 if not."""
    board = ProgressBoard()
    settings = make_settings(broker, topic, wait_stored_timeout_s=0.5)
    app = create_app(settings, store, producer=producer, progress_waiter=board, repo=repo)
    h = auth(tenant[1])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/events?wait=stored", json=events(8), headers=h)
        body = assert_error(r, 503, "accepted by the broker", "Retrying is safe", "idempotent")
        assert r.headers["retry-after"] == "3"
        assert body["details"][0]["field"] == "wait"
        assert "8 events accepted by the broker" in body["details"][0]["message"]

        async def worker() -> None:  # what the streams worker does after each commit
            while True:
                await asyncio.sleep(0.02)
                for p in range(4):
                    board.notify(topic, p, 10_000)

        task = asyncio.create_task(worker())
        try:
            r = await c.post("/v1/events?wait=stored", json=events(8, "s"), headers=h)
        finally:
            task.cancel()
        assert r.status_code == 202, r.text


async def test_broker_down_503_with_retry_after(
    store: Any, repo: Any, tenant: Any, unique: str
) -> None:
    b = BrokerProcess().start()
    try:
        create_topic(b.bootstrap, f"down.{unique}", 2)
        producer = EventProducer(b.bootstrap, f"down.{unique}", timeout_s=2.0, retry_after_s=3)
        settings = make_settings(b, f"down.{unique}")
        app = create_app(settings, store, producer=producer, progress_waiter=None, repo=repo)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            r = await c.post("/v1/events", json=events(3), headers=auth(tenant[1]))
            assert r.status_code == 202, r.text
            b.stop()
            r = await c.post("/v1/events", json=events(3, "d"), headers=auth(tenant[1]))
            body = assert_error(r, 503, "broker")
            assert body["error"] == "broker_unavailable"
            assert r.headers["retry-after"] == "3"
            r = await c.get("/readyz")
            assert_error(r, 503, "broker")
            assert r.headers["retry-after"]
        producer.close(0.5)
    finally:
        b.stop()


async def test_fuzzed_bodies_never_500(client: httpx.AsyncClient, tenant: tuple[str, str]) -> None:
    """Random JSON-ish bodies on every ingest flavour: always a 4xx/2xx with a message."""
    import random

    rnd = random.Random(7)
    now_ms = int(time.time() * 1000)
    atoms: list[Any] = [
        None, True, 0, -1, 1.5, 2**63 - 1, "", "x", "2025-01-01T00:00:00Z", now_ms, [], {},
        "\u0000", "é" * 300, {"a": [1, {"b": None}]},
    ]  # fmt: skip
    keys = ["id", "type", "customer", "time", "properties", "subject", "source", "specversion",
            "data", "zz"]  # fmt: skip

    def doc() -> Any:
        if rnd.random() < 0.2:
            return rnd.choice(atoms)
        return {k: rnd.choice(atoms) for k in rnd.sample(keys, rnd.randrange(len(keys)))}

    for i in range(150):
        body = [doc() for _ in range(rnd.randrange(1, 6))] if rnd.random() < 0.7 else doc()
        content = orjson.dumps(body)
        if rnd.random() < 0.05:
            content = content.replace(b"9223372036854775807", b"1" * 30)
        if rnd.random() < 0.1:
            content = content[: rnd.randrange(len(content) + 1)]
        path = rnd.choice(["/v1/events", "/api/v1/events"])
        ctype = rnd.choice(
            ["application/json", "application/cloudevents+json",
             "application/cloudevents-batch+json"]
        )  # fmt: skip
        r = await client.post(
            path, content=content, headers={**auth(tenant[1]), "Content-Type": ctype}
        )
        assert r.status_code < 500, (i, content, r.text)
        if r.status_code >= 400:
            assert r.json()["message"], (i, r.text)


async def test_unexpected_exception_is_generic_500(
    settings: Any, store: Any, repo: Any, producer: EventProducer
) -> None:
    app = create_app(settings, store, producer=producer, progress_waiter=None, repo=repo)

    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    app.add_api_route("/boom", boom)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.get("/boom")
    assert r.status_code == 500
    assert r.json() == {
        "error": "internal_error",
        "message": "internal server error (logged)",
        "details": [],
    }
    assert "secret" not in r.text


async def test_wait_stored_with_store_progress(
    broker: Any, topic: str, store: Any, repo: Any, producer: EventProducer, tenant: Any
) -> None:
    """Scale-out mode: the API polls the progress rows the worker's sink writes to ClickHouse."""
    from clickhouse.sink import ClickHouseSink
    from streams.progress import StoreProgressWaiter

    sink = ClickHouseSink(store)
    settings = make_settings(broker, topic, wait_stored_timeout_s=20.0)
    waiter = StoreProgressWaiter(sink, poll_s=0.05)
    app = create_app(settings, store, producer=producer, progress_waiter=waiter, repo=repo)
    h = auth(tenant[1])

    async def worker() -> None:  # commits progress once the events are in the topic
        got = await asyncio.to_thread(consume_all, broker.bootstrap, topic, 6)
        progress: dict[int, int] = {}
        for partition, offset, _key, _env in got:
            progress[partition] = max(offset, progress.get(partition, -1))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(sink.commit, topic, [], [], progress)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        task = asyncio.create_task(worker())
        r = await c.post("/v1/events?wait=stored", json=events(6), headers=h)
        await task
    assert r.status_code == 202, r.text
    assert sink.progress(topic)  # the answer came after the progress rows existed
