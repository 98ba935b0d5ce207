"""Tenant isolation for every endpoint, parametrised over the served OpenAPI document.

Two tenants, A and B, each with one object of every kind (``world.build_world``), on a real
Tally (API + worker, real broker and chDB: ``live.live_tally``). With A's key:

- every tenant operation whose path names an object answers 404 (the one error shape) for B's
  object, reads and writes alike (a valid body, so only the lookup can refuse);
- every write whose body names another object (a subscription's customer or plan, a threshold's
  meter, a plan charge's meter) is refused when that object is B's;
- every tenant operation without an id in its path shows nothing of B (no id of B's appears);
- and afterwards B's objects are exactly as they were (nothing was written into B).

The operations come from ``GET /openapi.json`` at collection time: a new route with an id in its
path and no entry in ``IDS`` fails ``test_every_tenant_route_is_covered``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from tally.settings import Settings
from tests.integration.api.conftest import ADMIN_TOKEN
from tests.integration.api.live import Live, live_tally
from tests.integration.api.world import WORLD_SETTINGS, World, build_world

# path parameter -> the world's id of that kind
IDS = {
    "slug": "meter",
    "key_id": "key_rotate",
    "code": "plan",
    "version": "plan_version",
    "external_id": "customer",
    "customer_id": "customer",
    "sub_id": "subscription",
    "invoice_id": "invoice_draft",
    "note_id": "credit_note",
    "event_id": "event",
    "endpoint_id": "endpoint",
    "delivery_id": "delivery",
    "dead_letter_id": "dead_letter",
    "discount_id": "discount",
    "threshold_id": "threshold",
}

# valid bodies of the writes with an id in their path (``{A...}``: an id of A's world)
BODIES: dict[str, Any] = {
    "POST /api/v1/meters/{slug}/query": {},
    "POST /v1/api-keys/{key_id}/rotate": {"name": "rotated"},
    "POST /v1/plans/{code}/versions": {"name": "v2"},
    "PATCH /v1/customers/{external_id}": {"name": "renamed"},
    "POST /v1/subscriptions/{sub_id}/actions": {"action": "cancel", "at": "now"},
    "POST /v1/subscriptions/{sub_id}/change-plan": {"plan_code": "{A.plan}"},
    "POST /v1/invoices/{invoice_id}/void": {"reason": "isolation"},
    "POST /v1/invoices/{invoice_id}/credit-notes": {"reason": "goodwill", "amount": "0.01"},
    "POST /v1/customers/{customer_id}/discounts": {"percentage": "10"},
    "POST /v1/events/{event_id}/corrections": {"action": "void", "reason": "isolation"},
    "POST /v1/customers/{customer_id}/thresholds": {"meter_slug": "{A.meter}", "value": "5"},
}

# writes whose body names B's objects (A's key): refused
CROSS_BODIES: list[tuple[str, str, Any]] = [
    ("POST", "/v1/subscriptions", {"customer_id": "{B.customer}", "plan_code": "{A.plan}"}),
    ("POST", "/v1/subscriptions", {"customer_id": "{A.customer_patch}", "plan_code": "{B.plan}"}),
    (
        "POST",
        "/v1/customers/{A.customer}/thresholds",
        {"meter_slug": "{B.meter}", "value": "5"},
    ),
    (
        "POST",
        "/v1/plans",
        {
            "code": "cross-plan",
            "name": "x",
            "currency": "USD",
            "charges": [
                {
                    "key": "use",
                    "meter_slug": "{B.meter}",
                    "price": {"model": "per_unit", "unit_amount": "1"},
                }
            ],
        },
    ),
    ("POST", "/v1/rating/preview", {"plan_code": "{B.plan}", "usage": {}}),
]

# what B owns, read with B's key before and after (volatile fields dropped)
SNAPSHOT = [
    "/v1/meters",
    "/v1/plans",
    "/v1/plans/{B.plan}/versions",
    "/v1/customers",
    "/v1/subscriptions",
    "/v1/invoices",
    "/v1/credit-notes",
    "/v1/api-keys",
    "/v1/webhooks/endpoints",
    "/v1/customers/{B.customer}/discounts",
    "/v1/customers/{B.customer}/thresholds",
    "/v1/events/{B.event}/corrections",
    "/v1/dead-letters",
]
VOLATILE = re.compile(r'"(last_used_at|updated_at|heartbeat_at)":\s*("[^"]*"|null)')


def _spec_operations() -> list[tuple[str, str, dict[str, Any]]]:
    class _NoStore:
        database = "none"

    app = create_app(
        Settings(admin_token=ADMIN_TOKEN),
        _NoStore(),
        producer=None,
        progress_waiter=None,
        repo=object(),
        billing_tasks=False,
    )
    spec = app.openapi()
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if {"ApiKey": []} in op.get("security", []):
                out.append((method.upper(), path, op))
    return out


OPERATIONS = _spec_operations()
WITH_IDS = [(m, p) for m, p, op in OPERATIONS if "{" in p]
LISTS = [(m, p) for m, p, op in OPERATIONS if "{" not in p and m == "GET"]


def _fill(value: Any, a: World, b: World) -> Any:
    if isinstance(value, str):
        for tag, w in (("A", a), ("B", b)):
            for name, ident in w.ids.items():
                value = value.replace("{" + f"{tag}.{name}" + "}", ident)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, a, b) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, a, b) for v in value]
    return value


def _path(path: str, w: World) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: w.ids[IDS[m.group(1)]], path)


@pytest.fixture(scope="module")
def worlds(
    broker: Any, chdb_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Live, World, World]]:
    from api.topics import create_topic
    from clickhouse.store import Store

    unique = uuid.uuid4().hex[:10]
    topic = f"tally.events.{unique}"
    create_topic(broker.bootstrap, topic, 4)
    store = Store.open(f"chdb://{chdb_dir}", f"test_{unique}")
    store.migrate()
    tmp = tmp_path_factory.mktemp("isolation")
    try:
        with live_tally(broker, topic, store, unique, tmp, **WORLD_SETTINGS) as live:
            a = build_world(live.url, ADMIN_TOKEN, "tenant-a", prefix="fa")
            b = build_world(live.url, ADMIN_TOKEN, "tenant-b", prefix="fb")
            yield live, a, b
    finally:
        store.close()


@pytest.fixture(scope="module")
def snapshot_before(worlds: tuple[Live, World, World]) -> dict[str, str]:
    live, a, b = worlds
    return _snapshot(live, a, b)


def _snapshot(live: Live, a: World, b: World) -> dict[str, str]:
    out = {}
    with httpx.Client(base_url=live.url, headers=b.auth, timeout=60) as c:
        for path in SNAPSHOT:
            r = c.get(_fill(path, a, b))
            assert r.status_code == 200, (path, r.text)
            out[path] = VOLATILE.sub("", r.text)
    return out


def _assert_not_found(r: httpx.Response, what: str) -> None:
    assert r.status_code == 404, f"{what}: {r.status_code} {r.text[:300]}"
    body = r.json()
    assert body["error"] == "not_found" and isinstance(body["message"], str), body
    assert isinstance(body["details"], list), body


def test_every_tenant_route_is_covered() -> None:
    names = {n for _m, p in WITH_IDS for n in re.findall(r"\{(\w+)\}", p)}
    assert names <= set(IDS), names - set(IDS)
    assert len(WITH_IDS) >= 40 and len(LISTS) >= 12, (len(WITH_IDS), len(LISTS))


@pytest.mark.parametrize(("method", "path"), WITH_IDS, ids=[f"{m} {p}" for m, p in WITH_IDS])
def test_objects_of_another_tenant_are_not_found(
    worlds: tuple[Live, World, World], snapshot_before: dict[str, str], method: str, path: str
) -> None:
    live, a, b = worlds
    body = _fill(BODIES.get(f"{method} {path}"), a, b)
    with httpx.Client(base_url=live.url, headers=a.auth, timeout=60) as c:
        r = c.request(method, _path(path, b), json=body)
        _assert_not_found(r, f"{method} {_path(path, b)} with A's key")
        # the same read of A's own object finds it (the ids are of the right kind)
        if method == "GET":
            own = c.request(method, _path(path, a))
            assert own.status_code != 404, (path, own.status_code, own.text[:300])


@pytest.mark.parametrize(("method", "path", "body"), CROSS_BODIES)
def test_writes_naming_another_tenants_objects_are_refused(
    worlds: tuple[Live, World, World],
    snapshot_before: dict[str, str],
    method: str,
    path: str,
    body: Any,
) -> None:
    live, a, b = worlds
    with httpx.Client(base_url=live.url, headers=a.auth, timeout=60) as c:
        r = c.request(method, _fill(path, a, b), json=_fill(body, a, b))
    assert r.status_code in (400, 404), (path, r.status_code, r.text[:300])
    err = r.json()
    assert err["error"] in ("invalid_request", "not_found") and isinstance(err["details"], list)


@pytest.mark.parametrize(("method", "path"), LISTS, ids=[f"{m} {p}" for m, p in LISTS])
def test_lists_show_nothing_of_another_tenant(
    worlds: tuple[Live, World, World], method: str, path: str
) -> None:
    live, a, b = worlds
    with httpx.Client(base_url=live.url, headers=a.auth, timeout=60) as c:
        r = c.request(method, path)
    assert r.status_code in (200, 400), (path, r.status_code, r.text[:300])
    secrets = {b.tenant_id, b.key, *b.ids.values()} - {b.ids["plan_version"]}
    leaked = sorted(s for s in secrets if s in r.text)
    assert not leaked, (path, leaked)


def test_nothing_was_written_into_the_other_tenant(
    worlds: tuple[Live, World, World], snapshot_before: dict[str, str]
) -> None:
    """Runs last in this module (pytest keeps file order): B after every request of A."""
    live, a, b = worlds
    assert _snapshot(live, a, b) == snapshot_before
