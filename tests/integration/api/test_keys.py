"""Key and admin-token lifecycle through the HTTP API, on a real store and broker.

Two apps on one store stand for two API processes: a revocation or rotation made through one is
honoured by the other within the stated bound (auth_positive_ttl_s; plus the overlap for
rotation). Secrets never appear in logs, metrics or error bodies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from api.app import create_app
from api.producer import EventProducer
from clickhouse.repo import Repo

from .conftest import ADMIN_TOKEN, auth, make_settings

pytestmark = pytest.mark.anyio

TTL = 1.0
OVERLAP = 8  # long enough for the "both work" checks on a loaded machine


@asynccontextmanager
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as c:
        yield c


def two_apps(
    broker: Any, topic: str, store: Any, repo: Repo, producer: EventProducer, **kw: Any
) -> tuple[FastAPI, FastAPI]:
    s = make_settings(broker, topic, auth_positive_ttl_s=TTL, **kw)
    a = create_app(s, store, producer=producer, progress_waiter=None, repo=repo)
    b = create_app(s, store, producer=producer, progress_waiter=None, repo=Repo(store))
    return a, b


def ev(i: int) -> dict[str, Any]:
    return {"id": f"k-{i}", "type": "t", "customer": "c", "properties": {}}


async def ok(c: httpx.AsyncClient, key: str) -> int:
    r = await c.get("/v1/meters", headers=auth(key))
    return r.status_code


async def test_keys_create_list_rotate_revoke_across_processes(
    broker: Any,
    topic: str,
    store: Any,
    repo: Repo,
    producer: EventProducer,
    tenant: tuple[str, str],
) -> None:
    tenant_id, first = tenant
    app_a, app_b = two_apps(broker, topic, store, repo, producer)
    async with http(app_a) as a, http(app_b) as b:
        # create a second, named key with an expiry; the secret is in the answer only
        r = await a.post(
            "/v1/api-keys",
            json={"name": "ci", "expires_at": "2099-01-01T00:00:00Z"},
            headers=auth(first),
        )
        assert r.status_code == 201, r.text
        created = r.json()
        ci_key, ci_id = created["api_key"], created["id"]
        assert created["name"] == "ci" and created["status"] == "active"
        assert created["expires_at"] == "2099-01-01T00:00:00.000Z"
        assert ci_key.startswith(f"tly_{tenant_id}_") and created["prefix"] == ci_key[:21]
        # both processes accept both keys
        for c in (a, b):
            assert await ok(c, first) == 200 and await ok(c, ci_key) == 200
        # the list never shows a secret
        r = await b.get("/v1/api-keys", headers=auth(ci_key))
        listed = r.json()["data"]
        assert [k["name"] for k in listed] == ["default", "ci"]
        assert first not in r.text and ci_key not in r.text and "api_key" not in r.text
        first_id = listed[0]["id"]
        # last use is written in batches (not per request): after a flush it is there
        for app in (app_a, app_b):
            await app.state.tally.flush_counters()
        r = await a.get(f"/v1/api-keys/{ci_id}", headers=auth(first))
        assert r.status_code == 200 and r.json()["last_used_at"] is not None

        # revoke ci through A: A refuses it at once, B within the TTL bound
        r = await a.delete(f"/v1/api-keys/{ci_id}", headers=auth(first))
        assert r.status_code == 200 and r.json()["status"] == "revoked"
        assert await ok(a, ci_key) == 401
        await asyncio.sleep(TTL + 0.2)
        assert await ok(b, ci_key) == 401
        body = (await b.get("/v1/meters", headers=auth(ci_key))).json()
        assert body["error"] == "unauthorized" and ci_key not in str(body)

        # rotate the first key with an overlap: both work, then only the new one
        r = await b.post(
            f"/v1/api-keys/{first_id}/rotate", json={"overlap_s": OVERLAP}, headers=auth(first)
        )
        assert r.status_code == 201, r.text
        rotated = r.json()
        new_key = rotated["api_key"]
        assert rotated["name"] == "default" and rotated["previous"]["id"] == first_id
        assert rotated["previous"]["expires_at"] is not None
        for c in (a, b):
            assert await ok(c, first) == 200 and await ok(c, new_key) == 200
        await asyncio.sleep(OVERLAP + TTL + 0.2)
        for c in (a, b):
            assert await ok(c, first) == 401 and await ok(c, new_key) == 200
        r = await a.get("/v1/api-keys", headers=auth(new_key))
        status = {k["id"]: k["status"] for k in r.json()["data"]}
        assert status[first_id] == "expired" and status[ci_id] == "revoked"
        # a dead key cannot be rotated; unknown ids are 404 with the one error shape
        r = await a.post(f"/v1/api-keys/{ci_id}/rotate", headers=auth(new_key))
        assert r.status_code == 409 and r.json()["details"][0]["field"] == "key_id"
        r = await a.delete("/v1/api-keys/0000000000000000", headers=auth(new_key))
        assert r.status_code == 404 and r.json()["details"][0]["field"] == "key_id"
        r = await a.post(
            "/v1/api-keys", json={"expires_at": "2001-01-01T00:00:00Z"}, headers=auth(new_key)
        )
        assert r.status_code == 400 and r.json()["details"][0]["field"] == "expires_at"
        r = await a.post("/v1/api-keys", json={"nope": 1}, headers=auth(new_key))
        assert r.status_code == 400 and r.json()["details"][0]["field"] == "nope"


async def test_a_tenant_cannot_touch_another_tenants_keys(
    client: httpx.AsyncClient, tenant: tuple[str, str], other_tenant: tuple[str, str]
) -> None:
    r = await client.get("/v1/api-keys", headers=auth(other_tenant[1]))
    other_id = r.json()["data"][0]["id"]
    for method, path in (
        ("GET", f"/v1/api-keys/{other_id}"),
        ("DELETE", f"/v1/api-keys/{other_id}"),
        ("POST", f"/v1/api-keys/{other_id}/rotate"),
    ):
        r = await client.request(method, path, headers=auth(tenant[1]))
        assert r.status_code == 404, (method, path, r.text)
    assert (await client.get("/v1/meters", headers=auth(other_tenant[1]))).status_code == 200


async def test_an_optional_body_is_absent_or_json(
    client: httpx.AsyncClient, tenant: tuple[str, str]
) -> None:
    """No body at all takes the defaults; a body of only whitespace is not JSON: 400 naming
    ``body``, and no key is made."""
    h = {**auth(tenant[1]), "Content-Type": "application/json"}
    before = len((await client.get("/v1/api-keys", headers=h)).json()["data"])
    for raw in (b"\t", b" \r\n "):
        r = await client.post("/v1/api-keys", content=raw, headers=h)
        assert r.status_code == 400, r.text
        assert [d["field"] for d in r.json()["details"]] == ["body"]
        assert "not valid JSON" in r.json()["message"]
    assert len((await client.get("/v1/api-keys", headers=h)).json()["data"]) == before
    r = await client.post("/v1/api-keys", content=b"", headers=h)
    assert r.status_code == 201, r.text
    assert r.json()["name"] == ""
    # a route's own limit is not the ingest setting: the 413 does not name max_request_bytes
    r = await client.post("/v1/api-keys", content=b" " * (16 * 1024 + 1), headers=h)
    assert r.status_code == 413, r.text
    assert r.json()["message"].endswith("the limit is 16384 bytes"), r.text


async def test_admin_manages_keys_limits_and_admin_tokens(
    broker: Any,
    topic: str,
    store: Any,
    repo: Repo,
    producer: EventProducer,
    tenant: tuple[str, str],
) -> None:
    tenant_id, key = tenant
    app_a, app_b = two_apps(broker, topic, store, repo, producer)
    adm = auth(ADMIN_TOKEN)
    async with http(app_a) as a, http(app_b) as b:
        r = await a.post(f"/v1/admin/tenants/{tenant_id}/keys", json={"name": "ops"}, headers=adm)
        assert r.status_code == 201 and r.json()["tenant_id"] == tenant_id
        ops_key, ops_id = r.json()["api_key"], r.json()["id"]
        r = await a.get(f"/v1/admin/tenants/{tenant_id}/keys", headers=adm)
        assert [k["name"] for k in r.json()["data"]] == ["default", "ops"]
        assert await ok(b, ops_key) == 200
        r = await a.delete(f"/v1/admin/tenants/{tenant_id}/keys/{ops_id}", headers=adm)
        assert r.status_code == 200
        await asyncio.sleep(TTL + 0.2)
        assert await ok(b, ops_key) == 401
        r = await a.get("/v1/admin/tenants/zzzzzzzzzzzz/keys", headers=adm)
        assert r.status_code == 404 and r.json()["details"][0]["field"] == "tenant_id"

        # admin tokens: create, use, revoke (effective in the other process within the bound)
        r = await a.post("/v1/admin/tokens", json={"name": "ci"}, headers=adm)
        assert r.status_code == 201
        tok, tok_id = r.json()["admin_token"], r.json()["id"]
        assert (await b.get("/v1/admin/tenants", headers=auth(tok))).status_code == 200
        r = await a.get("/v1/admin/tokens", headers=auth(tok))
        assert {t["name"] for t in r.json()["data"]} == {"TALLY_ADMIN_TOKEN", "ci"}
        assert tok not in r.text and ADMIN_TOKEN not in r.text
        r = await a.delete(f"/v1/admin/tokens/{tok_id}", headers=adm)
        assert r.status_code == 200 and r.json()["status"] == "revoked"
        assert (await a.get("/v1/admin/tenants", headers=auth(tok))).status_code == 401
        await asyncio.sleep(TTL + 0.2)
        assert (await b.get("/v1/admin/tenants", headers=auth(tok))).status_code == 401
        # the last active admin token cannot be revoked
        r = await a.get("/v1/admin/tokens", headers=adm)
        main_id = next(t["id"] for t in r.json()["data"] if t["status"] == "active")
        r = await a.delete(f"/v1/admin/tokens/{main_id}", headers=adm)
        assert r.status_code == 409 and r.json()["details"][0]["field"] == "token_id"
        # an API key is not an admin token and vice versa
        assert (await a.get("/v1/admin/tenants", headers=auth(key))).status_code == 401
        assert (await a.get("/v1/meters", headers=adm)).status_code == 401


async def test_secrets_never_reach_logs_metrics_or_error_bodies(
    broker: Any,
    topic: str,
    store: Any,
    repo: Repo,
    producer: EventProducer,
    tenant: tuple[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tenant_id, key = tenant
    s = make_settings(broker, topic, metrics_token="metrics-secret-token-123")
    app = create_app(s, store, producer=producer, progress_waiter=None, repo=repo)
    secrets_seen: list[str] = [key, ADMIN_TOKEN, "metrics-secret-token-123"]
    bodies: list[str] = []
    caplog.set_level(logging.DEBUG)
    async with http(app) as c:
        adm = auth(ADMIN_TOKEN)
        r = await c.post(f"/v1/admin/tenants/{tenant_id}/keys", headers=adm)
        secrets_seen.append(r.json()["api_key"])
        r = await c.post("/v1/admin/tokens", headers=adm)
        secrets_seen.append(r.json()["admin_token"])
        r = await c.get("/v1/api-keys", headers=auth(key))
        kid = r.json()["data"][0]["id"]
        r = await c.post(f"/v1/api-keys/{kid}/rotate", json={"overlap_s": 0}, headers=auth(key))
        secrets_seen.append(r.json()["api_key"])
        # every failure path that sees a secret
        for h in (
            auth(key),  # expired by the rotation
            auth(key + "x"),
            auth(ADMIN_TOKEN + "x"),
            {"Authorization": key},
            {"Authorization": "Basic " + key},
            auth(secrets_seen[-1] + "\x00"),
        ):
            for path in ("/v1/meters", "/v1/admin/tenants", "/v1/events"):
                bodies.append((await c.get(path, headers=h)).text)
                bodies.append((await c.post(path, json=[ev(1)], headers=h)).text)
        for _ in range(40):  # until the address is limited (429)
            bodies.append((await c.get("/v1/meters", headers=auth(key + "y"))).text)
        assert any('"rate_limited"' in b for b in bodies)
        r = await c.get("/metrics")
        assert r.status_code == 401
        bodies.append(r.text)
        r = await c.get("/metrics", headers=auth("metrics-secret-token-123"))
        assert r.status_code == 200 and "tally_auth_failures_total" in r.text
        bodies.append(r.text)
        await app.state.tally.flush_counters()
    text = caplog.text + "\n".join(bodies)
    for secret in secrets_seen:
        assert secret not in text
        if secret.startswith("tly_"):  # nor the secret part alone (after tly_<tenant>_ / tla_)
            assert secret[len("tly_") + 13 :] not in text
        elif secret.startswith("tla_"):
            assert secret[len("tla_") :] not in text
