"""Catalog and invoice API end to end on a real chDB: plans with versions, customers,
subscriptions, the upcoming invoice from live usage, upgrades, isolation and bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from billing.catalog import Catalog
from billing.ports import open_billing_store
from rating.periods import period_containing
from schemas.catalog import ChangePlanIn
from schemas.timeutil import utc_now

from .conftest import Tenant

pytestmark = pytest.mark.anyio

D = Decimal

GROWTH: dict[str, Any] = {
    "code": "growth",
    "name": "Growth",
    "currency": "USD",
    "interval": "month",
    "charges": [
        {
            "key": "base",
            "description": "Platform fee",
            "price": {"model": "flat", "amount": "49.00"},
        },
        {
            "key": "api",
            "meter_slug": "api",
            "price": {
                "model": "graduated",
                "tiers": [
                    {"up_to": "100", "unit_amount": "0"},
                    {"up_to": "1000", "unit_amount": "0.02"},
                    {"up_to": None, "unit_amount": "0.01"},
                ],
            },
        },
        {
            "key": "storage",
            "meter_slug": "storage",
            "price": {
                "model": "per_unit",
                "unit_amount": "0.25",
                "package": {"divide_by": "10", "round": "up"},
            },
        },
        {
            "key": "compute",
            "meter_slug": "compute",
            "group_by": "region",
            "price": {
                "model": "volume",
                "tiers": [
                    {"up_to": "100", "unit_amount": "0.10"},
                    {"up_to": "1000", "unit_amount": "0.08"},
                    {"up_to": None, "unit_amount": "0.05"},
                ],
            },
        },
    ],
}


def plan_body(code: str, fixed: str, api_unit: str) -> dict[str, Any]:
    return {
        "code": code,
        "name": code.title(),
        "currency": "USD",
        "charges": [
            {"key": "base", "price": {"model": "flat", "amount": fixed}},
            {
                "key": "api",
                "meter_slug": "api",
                "price": {"model": "per_unit", "unit_amount": api_unit},
            },
        ],
    }


def month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


async def post(c: httpx.AsyncClient, t: Tenant, path: str, body: Any, status: int = 201) -> Any:
    r = await c.post(path, json=body, headers=t.headers)
    assert r.status_code == status, r.text
    return r.json()


async def get(c: httpx.AsyncClient, t: Tenant, path: str, status: int = 200) -> Any:
    r = await c.get(path, headers=t.headers)
    assert r.status_code == status, r.text
    return r.json()


def amounts(invoice: dict[str, Any]) -> list[tuple[str, str | None, Any, str]]:
    return [(ln["kind"], ln["charge_key"], ln["group"], ln["amount"]) for ln in invoice["lines"]]


async def test_upcoming_invoice_from_live_usage_to_the_cent(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    await post(client, tenant, "/v1/plans", GROWTH)
    await post(
        client,
        tenant,
        "/v1/customers",
        {
            "external_id": "cust-1",
            "name": "Cust One",
            "currency": "usd",
            "tax_rates": {"VAT": "20"},
        },
    )
    start = month_start(utc_now())
    sub = await post(
        client,
        tenant,
        "/v1/subscriptions",
        {"customer_id": "cust-1", "plan_code": "growth", "start_at": iso(start)},
    )
    assert (sub["status"], sub["plan_version"]) == ("active", 1)

    m = timedelta(minutes=1)
    events: list[tuple[str, datetime, dict[str, Any]]] = []
    events += [("api", start + (i % 7) * m, {}) for i in range(2550)]
    events += [("storage", start + 2 * m, {"gb": 50}), ("storage", start + 3 * m, {"gb": "123.4"})]
    events += [("storage", start + 4 * m, {"gb": 80})]
    events += [("compute", start + 5 * m, {"seconds": 100, "region": "eu"})]
    events += [("compute", start + 6 * m, {"seconds": 50, "region": "eu"})]
    events += [("compute", start + 5 * m, {"seconds": 1000, "region": "us"})]
    events += [("compute", start + 8 * m, {"seconds": "234.567", "region": "us"})]
    tenant.usage("cust-1", events)
    # Not this invoice: the previous period, and another customer.
    tenant.usage(
        "cust-1", [("api", start - m, {}), ("compute", start - m, {"seconds": 9, "region": "eu"})]
    )
    tenant.usage("cust-2", [("api", start + m, {}) for _ in range(50)])

    inv = await get(client, tenant, "/v1/customers/cust-1/upcoming-invoice")
    # Hand computation:
    #   base     flat                                                     49.00
    #   api      count 2550, graduated: 100*0 + 900*0.02 = 18 + 1550*0.01 = 15.5  33.50
    #   storage  max 123.4 GB; per 10 GB started: 13 * 0.25                 3.25
    #   compute eu  sum 150 s, volume tier 2: 150 * 0.08                   12.00
    #   compute us  sum 1234.567 s, volume tier 3: * 0.05 = 61.72835 ->     61.73
    #   subtotal 159.48; VAT 20% per line 9.80+6.70+0.65+2.40+12.35 = 31.90; total 191.38
    assert amounts(inv) == [
        ("fixed", "base", None, "49.00"),
        ("usage", "api", None, "33.50"),
        ("usage", "storage", None, "3.25"),
        ("usage", "compute", {"region": "eu"}, "12.00"),
        ("usage", "compute", {"region": "us"}, "61.73"),
    ]
    assert (inv["subtotal"], inv["tax"], inv["total"]) == ("159.48", "31.90", "191.38")
    assert inv["taxes"] == [{"name": "VAT", "rate": "20", "amount": "31.90"}]
    assert inv["currency"] == "USD" and inv["plan_code"] == "growth"
    assert datetime.fromisoformat(inv["period_start"]) == start

    # Live: the next stored events show up in the very next read (no cache).
    tenant.usage("cust-1", [("api", start + 9 * m, {}) for _ in range(100)])
    inv = await get(client, tenant, "/v1/customers/cust-1/upcoming-invoice")
    # api 2650: 18 + 1650 * 0.01 = 34.50 -> subtotal 160.48; VAT +0.20 = 32.10; total 192.58
    assert amounts(inv)[1][3] == "34.50"
    assert (inv["subtotal"], inv["tax"], inv["total"]) == ("160.48", "32.10", "192.58")


async def test_upgrade_mid_period_prorates_to_the_cent(
    client: httpx.AsyncClient, tenant: Tenant, store: Any
) -> None:
    await post(client, tenant, "/v1/plans", plan_body("basic", "10.00", "0.01"))
    await post(client, tenant, "/v1/plans", plan_body("pro", "30.00", "0.005"))
    now = utc_now()
    anchor = (now - timedelta(days=20)).replace(second=0, microsecond=0)
    await post(
        client,
        tenant,
        "/v1/customers",
        {"external_id": "up-1", "name": "Up", "currency": "USD", "billing_anchor": iso(anchor)},
    )
    sub = await post(
        client,
        tenant,
        "/v1/subscriptions",
        {
            "customer_id": "up-1",
            "plan_code": "basic",
            "start_at": iso(anchor),
            "alignment": "anniversary",
        },
    )
    period = period_containing(anchor, "month", now, "UTC", "anniversary")
    assert period.start == anchor
    # Upgrade exactly half-way through the period (28..31 days, so before "now" = anchor + 20 d).
    half = period.start + (period.end - period.start) / 2
    Catalog(open_billing_store(store)).change_subscription_plan(
        tenant.id, sub["id"], ChangePlanIn(plan_code="pro"), now=half
    )
    got = await get(client, tenant, f"/v1/subscriptions/{sub['id']}")
    assert (got["plan_code"], got["plan_version"]) == ("pro", 1)
    assert [h["plan_code"] for h in got["history"]] == ["basic", "pro"]

    tenant.usage("up-1", [("api", anchor + timedelta(hours=1), {}) for _ in range(1001)])
    tenant.usage("up-1", [("api", half + timedelta(hours=1), {}) for _ in range(1001)])
    inv = await get(client, tenant, "/v1/customers/up-1/upcoming-invoice")
    # Hand computation (the change is at exactly half of the period, whatever its length):
    #   base basic, billed in advance            10.00
    #   credit unused half of basic: -10 * 1/2   -5.00
    #   charge remaining half of pro: 30 * 1/2   15.00
    #   api before the change, basic: 1001 * 0.01  = 10.01
    #   api after the change, pro:    1001 * 0.005 = 5.005 -> 5.01 (half-up, once per line)
    #   subtotal = 10.00 - 5.00 + 15.00 + 10.01 + 5.01 = 35.02 (no tax)
    assert [(k, a) for k, _, _, a in amounts(inv)] == [
        ("fixed", "10.00"),
        ("proration", "-5.00"),
        ("proration", "15.00"),
        ("usage", "10.01"),
        ("usage", "5.01"),
    ]
    lines = inv["lines"]
    assert datetime.fromisoformat(lines[1]["period_start"]) == half
    assert datetime.fromisoformat(lines[3]["period_end"]) == half  # usage split at the change
    assert (inv["subtotal"], inv["tax"], inv["total"]) == ("35.02", "0.00", "35.02")


async def test_plan_versions_are_immutable_and_pinned(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    v1 = await post(client, tenant, "/v1/plans", plan_body("team", "20.00", "0.01"))
    assert v1["version"] == 1
    await post(
        client, tenant, "/v1/customers", {"external_id": "a", "name": "A", "currency": "USD"}
    )
    await post(
        client, tenant, "/v1/customers", {"external_id": "b", "name": "B", "currency": "USD"}
    )
    start = month_start(utc_now())
    sub_a = await post(
        client,
        tenant,
        "/v1/subscriptions",
        {"customer_id": "a", "plan_code": "team", "start_at": iso(start)},
    )
    # Publish v2: a new fixed fee; the name is copied from v1.
    v2 = await post(
        client,
        tenant,
        "/v1/plans/team/versions",
        {"charges": [{"key": "base", "price": {"model": "flat", "amount": "25.00"}}]},
    )
    assert (v2["version"], v2["name"]) == (2, "Team")
    assert (await get(client, tenant, "/v1/plans/team"))["version"] == 2
    old = await get(client, tenant, "/v1/plans/team/versions/1")
    assert old == v1  # unchanged
    assert [
        p["version"] for p in (await get(client, tenant, "/v1/plans/team/versions"))["data"]
    ] == [1, 2]
    assert [
        (p["code"], p["version"]) for p in (await get(client, tenant, "/v1/plans"))["data"]
    ] == [("team", 2)]
    # The existing subscription keeps v1 and is billed on it.
    got = await get(client, tenant, f"/v1/subscriptions/{sub_a['id']}")
    assert got["plan_version"] == 1
    inv = await get(client, tenant, "/v1/customers/a/upcoming-invoice")
    assert amounts(inv)[0] == ("fixed", "base", None, "20.00")
    assert inv["plan_version"] == 1
    # A new subscription gets the latest version.
    sub_b = await post(
        client,
        tenant,
        "/v1/subscriptions",
        {"customer_id": "b", "plan_code": "team", "start_at": iso(start)},
    )
    assert sub_b["plan_version"] == 2
    inv_b = await get(client, tenant, "/v1/customers/b/upcoming-invoice")
    assert [a for *_, a in amounts(inv_b)] == ["25.00"]
    # Moving a onto v2 is explicit: a plan change (an upgrade: immediate).
    moved = await post(
        client,
        tenant,
        f"/v1/subscriptions/{sub_a['id']}/change-plan",
        {"plan_code": "team", "version": 2},
        status=200,
    )
    assert moved["plan_version"] == 2
    assert await get(client, tenant, "/v1/plans/team/versions/3", status=404)


async def test_subscription_lifecycle_over_http(client: httpx.AsyncClient, tenant: Tenant) -> None:
    await post(client, tenant, "/v1/plans", plan_body("basic", "10.00", "0.01"))
    await post(client, tenant, "/v1/plans", plan_body("cheap", "5.00", "0.01"))
    await post(
        client, tenant, "/v1/customers", {"external_id": "life", "name": "L", "currency": "USD"}
    )
    trial_end = utc_now() + timedelta(days=7)
    sub = await post(
        client,
        tenant,
        "/v1/subscriptions",
        {"customer_id": "life", "plan_code": "basic", "trial_end": iso(trial_end)},
    )
    sid = sub["id"]
    assert sub["status"] == "trialing"
    act = f"/v1/subscriptions/{sid}/actions"
    r = await post(client, tenant, act, {"action": "pause"}, status=409)
    assert r["error"] == "conflict" and "activate it first" in r["message"]
    assert r["details"][0]["field"] == "action"
    assert "a trialing subscription cannot be paused" in r["details"][0]["message"]
    assert (await post(client, tenant, act, {"action": "activate"}, status=200))[
        "status"
    ] == "active"
    assert (await post(client, tenant, act, {"action": "pause"}, status=200))["status"] == "paused"
    r = await post(
        client, tenant, f"/v1/subscriptions/{sid}/change-plan", {"plan_code": "cheap"}, status=409
    )
    assert "resume it first" in r["message"]
    assert (await post(client, tenant, act, {"action": "resume"}, status=200))["status"] == "active"
    # A downgrade waits for the period end by default.
    down = await post(
        client, tenant, f"/v1/subscriptions/{sid}/change-plan", {"plan_code": "cheap"}, status=200
    )
    assert down["plan_code"] == "basic" and down["pending_change"]["plan_code"] == "cheap"
    sched = await post(client, tenant, act, {"action": "cancel", "at": "period_end"}, status=200)
    assert sched["status"] == "active" and sched["cancel_at"] is not None
    r = await post(client, tenant, act, {"action": "cancel", "at": "period_end"}, status=409)
    assert "already scheduled" in r["message"]
    # One live subscription per customer.
    r = await post(
        client,
        tenant,
        "/v1/subscriptions",
        {"customer_id": "life", "plan_code": "cheap"},
        status=409,
    )
    assert r["details"][0]["field"] == "customer_id"
    done = await post(client, tenant, act, {"action": "cancel"}, status=200)
    assert done["status"] == "canceled" and done["pending_change"] is None
    assert [h["status"] for h in done["history"]] == [
        "trialing",
        "active",
        "paused",
        "active",
        "canceled",
    ]
    for action in ("activate", "pause", "resume", "cancel"):
        r = await post(client, tenant, act, {"action": action}, status=409)
        assert "cancel" in r["message"]
    # The final period's invoice is still available: fees for the active time only.
    inv = await get(client, tenant, "/v1/customers/life/upcoming-invoice")
    assert inv["status"] == "canceled"
    listed = await get(client, tenant, "/v1/subscriptions?customer_id=life")
    assert [s["id"] for s in listed["data"]] == [sid]
    # After the cancellation a new subscription is allowed.
    await post(client, tenant, "/v1/subscriptions", {"customer_id": "life", "plan_code": "cheap"})


async def test_customers_crud(client: httpx.AsyncClient, tenant: Tenant) -> None:
    body = {
        "external_id": "crm-42",
        "name": "Forty Two",
        "currency": "EUR",
        "timezone": "Europe/Paris",
        "tax_rates": {"VAT": "19.6"},
        "metadata": {"crm": "hubspot"},
    }
    c = await post(client, tenant, "/v1/customers", body)
    assert c["currency"] == "EUR" and c["timezone"] == "Europe/Paris" and c["revision"] == 1
    r = await post(client, tenant, "/v1/customers", body, status=409)
    assert r["details"][0]["field"] == "external_id"
    r = await client.patch(
        "/v1/customers/crm-42", json={"name": "42 Ltd", "tax_rates": {}}, headers=tenant.headers
    )
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["tax_rates"], r.json()["revision"]) == ("42 Ltd", {}, 2)
    got = await get(client, tenant, "/v1/customers/crm-42")
    assert got["name"] == "42 Ltd" and got["metadata"] == {"crm": "hubspot"}
    assert [x["external_id"] for x in (await get(client, tenant, "/v1/customers"))["data"]] == [
        "crm-42"
    ]
    # The currency is fixed once the customer has a subscription.
    await post(client, tenant, "/v1/plans", {**plan_body("eu", "9.00", "0.01"), "currency": "EUR"})
    await post(client, tenant, "/v1/subscriptions", {"customer_id": "crm-42", "plan_code": "eu"})
    r = await client.patch("/v1/customers/crm-42", json={"currency": "USD"}, headers=tenant.headers)
    assert r.status_code == 409 and r.json()["details"][0]["field"] == "currency"


async def test_tenant_isolation(client: httpx.AsyncClient, tenant: Tenant, other: Tenant) -> None:
    await post(client, tenant, "/v1/plans", plan_body("basic", "10.00", "0.01"))
    await post(
        client, tenant, "/v1/customers", {"external_id": "c1", "name": "A's", "currency": "USD"}
    )
    start = month_start(utc_now())
    sub = await post(
        client,
        tenant,
        "/v1/subscriptions",
        {"customer_id": "c1", "plan_code": "basic", "start_at": iso(start)},
    )
    tenant.usage("c1", [("api", start, {}) for _ in range(500)])

    assert (await get(client, other, "/v1/plans"))["data"] == []
    assert (await get(client, other, "/v1/customers"))["data"] == []
    assert (await get(client, other, "/v1/subscriptions"))["data"] == []
    await get(client, other, "/v1/plans/basic", status=404)
    await get(client, other, "/v1/plans/basic/versions/1", status=404)
    await get(client, other, "/v1/customers/c1", status=404)
    await get(client, other, f"/v1/subscriptions/{sub['id']}", status=404)
    await get(client, other, "/v1/customers/c1/upcoming-invoice", status=404)
    await post(
        client, other, f"/v1/subscriptions/{sub['id']}/actions", {"action": "cancel"}, status=404
    )
    r = await client.patch("/v1/customers/c1", json={"name": "x"}, headers=other.headers)
    assert r.status_code == 404
    await post(
        client, other, "/v1/subscriptions", {"customer_id": "c1", "plan_code": "basic"}, status=404
    )

    # The same codes and ids in the other tenant are independent, and so is the usage.
    await post(client, other, "/v1/plans", plan_body("basic", "99.00", "1"))
    await post(
        client, other, "/v1/customers", {"external_id": "c1", "name": "B's", "currency": "USD"}
    )
    await post(
        client,
        other,
        "/v1/subscriptions",
        {"customer_id": "c1", "plan_code": "basic", "start_at": iso(start)},
    )
    inv_b = await get(client, other, "/v1/customers/c1/upcoming-invoice")
    assert [a for *_, a in amounts(inv_b)] == ["99.00", "0.00"]
    inv_a = await get(client, tenant, "/v1/customers/c1/upcoming-invoice")
    assert [a for *_, a in amounts(inv_a)] == ["10.00", "5.00"]
    assert (await get(client, tenant, "/v1/customers/c1"))["name"] == "A's"
    # No key, no access.
    r = await client.get("/v1/plans")
    assert r.status_code == 401


BAD = [
    ("/v1/plans", {**GROWTH, "code": "Bad Code"}, 400, "code"),
    ("/v1/plans", {**GROWTH, "currency": "XYZ"}, 400, "currency"),
    (
        "/v1/plans",
        {
            "code": "f",
            "name": "F",
            "currency": "USD",
            "charges": [{"key": "x", "price": {"model": "flat", "amount": 1.5}}],
        },
        400,
        "charges.0.price.flat.amount",
    ),
    (
        "/v1/plans",
        {
            "code": "f",
            "name": "F",
            "currency": "USD",
            "charges": [
                {
                    "key": "x",
                    "meter_slug": "nope",
                    "price": {"model": "per_unit", "unit_amount": "1"},
                }
            ],
        },
        400,
        "charges.0.meter_slug",
    ),
    (
        "/v1/plans",
        {
            "code": "f",
            "name": "F",
            "currency": "USD",
            "charges": [
                {
                    "key": "x",
                    "meter_slug": "api",
                    "group_by": "region",
                    "price": {"model": "per_unit", "unit_amount": "1"},
                }
            ],
        },
        400,
        "charges.0.group_by",
    ),
    (
        "/v1/customers",
        {"external_id": "x", "name": "X", "currency": "USD", "timezone": "Mars/Base"},
        400,
        "timezone",
    ),
    ("/v1/customers", {"external_id": "x", "name": "X"}, 400, "currency"),
    (
        "/v1/customers",
        {"external_id": "x", "name": "X", "currency": "USD", "tax_rates": {"VAT": "120"}},
        400,
        "tax_rates.VAT",
    ),
    (
        "/v1/customers",
        {
            "external_id": "x",
            "name": "X",
            "currency": "USD",
            "billing_anchor": "2024-01-01T00:00:00",
        },
        400,
        "billing_anchor",
    ),
    ("/v1/subscriptions", {"customer_id": "ghost", "plan_code": "growth"}, 404, "customer_id"),
    ("/v1/subscriptions", {"customer_id": "ok", "plan_code": "nope"}, 404, "plan_code"),
    (
        "/v1/subscriptions",
        {"customer_id": "ok", "plan_code": "growth", "plan_version": 9},
        404,
        "plan_version",
    ),
    (
        "/v1/subscriptions",
        {"customer_id": "ok", "plan_code": "growth", "alignment": "weekly"},
        400,
        "alignment",
    ),
    (
        "/v1/subscriptions",
        {
            "customer_id": "ok",
            "plan_code": "growth",
            "start_at": "2024-02-01T00:00:00Z",
            "trial_end": "2024-01-01T00:00:00Z",
        },
        400,
        "body",
    ),
    (
        "/v1/rating/preview",
        {"price": {"model": "flat", "amount": "1"}, "plan_code": "growth"},
        400,
        "body",
    ),
    (
        "/v1/rating/preview",
        {"price": {"model": "per_unit"}, "quantity": "3", "currency": "USD"},
        400,
        "price.per_unit.unit_amount",
    ),
    ("/v1/rating/preview", {"plan_code": "growth", "usage": {"api": 1.5}}, 400, "usage.api"),
    ("/v1/rating/preview", {"plan_code": "growth", "usage": {"nope": "3"}}, 400, "usage.nope"),
    (
        "/v1/plans/growth/versions",
        {
            "currency": "EUR",
            "charges": [{"key": "x", "price": {"model": "flat", "amount": "1", "currency": "USD"}}],
        },
        400,
        "charges.0.price.currency",
    ),
    ("/v1/plans/nope/versions", {"name": "x"}, 404, "code"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "field"), BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD]
)
async def test_bad_input_is_4xx_naming_the_field(
    client: httpx.AsyncClient, tenant: Tenant, path: str, body: Any, status: int, field: str
) -> None:
    await post(client, tenant, "/v1/plans", GROWTH)
    await post(
        client, tenant, "/v1/customers", {"external_id": "ok", "name": "Ok", "currency": "USD"}
    )
    r = await client.post(path, json=body, headers=tenant.headers)
    assert r.status_code == status, r.text
    data = r.json()
    details = data["details"]
    fields = [d["field"] for d in details]
    assert any(f == field or f.startswith(field) for f in fields), (fields, data["message"])
    assert field.split(".")[0] in data["message"] or status == 404


async def test_bad_requests_other_shapes(client: httpx.AsyncClient, tenant: Tenant) -> None:
    h = tenant.headers
    r = await client.post("/v1/plans", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "body"
    r = await client.post("/v1/plans", content=b"", headers=h)
    assert r.status_code == 400
    r = await client.post("/v1/plans", json=[1, 2], headers=h)
    assert r.status_code == 400
    r = await client.get("/v1/plans/x/versions/zero", headers=h)
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "version"
    r = await client.get("/v1/customers?limit=0", headers=h)
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "limit"
    r = await client.post("/v1/subscriptions/sub_x/actions", json={"action": "explode"}, headers=h)
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "action"
    r = await client.post(
        "/v1/subscriptions/sub_x/actions", json={"action": "pause", "at": "period_end"}, headers=h
    )
    assert r.status_code == 400 and "period_end" in r.json()["message"]
    r = await client.post(
        "/v1/subscriptions/sub_x/change-plan", json={"plan_code": "growth", "version": 0}, headers=h
    )
    assert r.status_code == 400 and r.json()["details"][0]["field"] == "version"
    r = await client.post("/v1/subscriptions/sub_x/actions", json={"action": "pause"}, headers=h)
    assert r.status_code == 404
    r = await client.post("/v1/plans", json=GROWTH, headers=h)
    assert r.status_code == 201
    r = await client.post("/v1/plans", json=GROWTH, headers=h)
    assert r.status_code == 409 and r.json()["details"][0]["field"] == "code"
    r = await client.get("/v1/customers/nobody/upcoming-invoice", headers=h)
    assert r.status_code == 404


async def test_rating_preview(client: httpx.AsyncClient, tenant: Tenant) -> None:
    r = await post(
        client,
        tenant,
        "/v1/rating/preview",
        {
            "price": {"model": "package", "package_size": "100", "amount": "2.5"},
            "quantity": "250",
            "currency": "USD",
        },
        status=200,
    )
    assert [ln["amount"] for ln in r["lines"]] == ["7.50"] and r["total"] == "7.50"
    usage = {"api": "2550", "storage": "123.4", "compute": {"eu": "150", "us": "1234.567"}}
    inline = await post(
        client,
        tenant,
        "/v1/rating/preview",
        {"plan": GROWTH, "usage": usage, "tax_rates": {"VAT": "20"}},
        status=200,
    )
    assert (inline["subtotal"], inline["tax"], inline["total"]) == ("159.48", "31.90", "191.38")
    await post(client, tenant, "/v1/plans", GROWTH)
    stored = await post(
        client, tenant, "/v1/rating/preview", {"plan_code": "growth", "usage": usage}, status=200
    )
    assert stored["subtotal"] == "159.48" and stored["tax"] == "0.00"
    # Preview stores nothing.
    assert [p["code"] for p in (await get(client, tenant, "/v1/plans"))["data"]] == ["growth"]
    assert (await get(client, tenant, "/v1/customers"))["data"] == []
    # Minimum commitment as its own line.
    r = await post(
        client,
        tenant,
        "/v1/rating/preview",
        {
            "price": {
                "model": "per_unit",
                "unit_amount": "0.1",
                "minimum": "10",
                "currency": "USD",
            },
            "usage": {"x": "7"},
        },
        status=200,
    )
    assert [(ln["kind"], ln["amount"]) for ln in r["lines"]] == [
        ("usage", "0.70"),
        ("minimum_adjustment", "9.30"),
    ]
    assert r["total"] == "10.00"


def test_first_published_version_wins(store: Any, repo: Any) -> None:
    """Two Catalog instances (as two API processes) publishing the same version: the first
    write stays the version; the later writer gets 409 and nothing it wrote shows."""
    from schemas.pricing import PlanSpec

    t, _ = repo.create_tenant("race")
    a, b = Catalog(open_billing_store(store)), Catalog(open_billing_store(store))
    spec = {"code": "p", "name": "P", "currency": "USD", "charges": []}
    a.create_plan(t.tenant_id, PlanSpec.model_validate(spec))
    from schemas.catalog import PlanDraft, PlanVersion

    v2a = a.publish_version(t.tenant_id, "p", PlanDraft(name="from a"))
    # b computed the same next version before seeing a's write: simulate with a direct insert.
    late = PlanVersion(**{**v2a.model_dump(), "name": "from b", "created_at": datetime.now(UTC)})
    with pytest.raises(Exception, match="published concurrently"):
        b._insert_plan(t.tenant_id, late)
    assert a.get_plan(t.tenant_id, "p").name == "from a"
    assert b.get_plan(t.tenant_id, "p", 2).name == "from a"


async def test_percentage_fee_counts_events_from_the_pre_aggregates(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    body = {
        "code": "payments",
        "name": "Payments",
        "currency": "USD",
        "charges": [
            {
                "key": "fees",
                "meter_slug": "compute",
                "group_by": "region",
                "price": {"model": "percentage", "rate": "2.9", "fixed_amount": "0.30"},
            }
        ],
    }
    await post(client, tenant, "/v1/plans", body)
    await post(
        client, tenant, "/v1/customers", {"external_id": "shop", "name": "S", "currency": "USD"}
    )
    start = month_start(utc_now())
    await post(
        client,
        tenant,
        "/v1/subscriptions",
        {"customer_id": "shop", "plan_code": "payments", "start_at": iso(start)},
    )
    m = timedelta(minutes=1)
    tenant.usage(
        "shop",
        [("compute", start + i * m, {"seconds": "100", "region": "eu"}) for i in range(3)]
        + [("compute", start, {"seconds": "19.99", "region": "us"})],
    )
    inv = await get(client, tenant, "/v1/customers/shop/upcoming-invoice")
    # eu: 300 * 2.9% = 8.70 + 3 events * 0.30 = 0.90  -> 9.60
    # us: 19.99 * 2.9% = 0.57971 + 1 * 0.30 = 0.87971 -> 0.88
    assert amounts(inv) == [
        ("usage", "fees", {"region": "eu"}, "9.60"),
        ("usage", "fees", {"region": "us"}, "0.88"),
    ]
    assert inv["total"] == "10.48"
