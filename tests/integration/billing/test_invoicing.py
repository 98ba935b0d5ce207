"""Invoice runs and the invoice lifecycle on a real chDB, through the HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from .conftest import Tenant

pytestmark = pytest.mark.anyio

PLAN: dict[str, Any] = {
    "code": "std",
    "name": "Standard",
    "currency": "USD",
    "charges": [
        {
            "key": "base",
            "description": "Platform fee",
            "price": {"model": "flat", "amount": "30.00"},
        },
        {
            "key": "api",
            "meter_slug": "api",
            "description": "API calls",
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
            "description": "Storage (peak GB)",
            "price": {"model": "per_unit", "unit_amount": "0.25"},
        },
    ],
}


def T(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).astimezone(UTC)


async def call(
    c: httpx.AsyncClient, t: Tenant, method: str, path: str, body: Any = None, status: int = 200
) -> Any:
    r = await c.request(method, path, json=body, headers=t.headers)
    assert r.status_code == status, r.text
    return r.json() if r.headers.get("content-type", "").startswith("application/json") else r


async def setup_customer(c: httpx.AsyncClient, t: Tenant, ext: str = "acme-1") -> str:
    await call(
        c,
        t,
        "POST",
        "/v1/customers",
        {"external_id": ext, "name": "Acme One", "currency": "USD", "tax_rates": {"VAT": "20"}},
        201,
    )
    sub = await call(
        c,
        t,
        "POST",
        "/v1/subscriptions",
        {"customer_id": ext, "plan_code": "std", "start_at": "2025-01-15T00:00:00Z"},
        201,
    )
    return str(sub["id"])


def lines(inv: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    return [(ln["kind"], ln.get("charge_key"), ln["amount"]) for ln in inv["lines"]]


async def test_run_finalize_rerun_late_usage_void_and_credit_note(
    client: httpx.AsyncClient, tenant: Tenant, services: Any
) -> None:
    await call(client, tenant, "POST", "/v1/plans", PLAN, 201)
    sub_id = await setup_customer(client, tenant)
    m = timedelta(minutes=1)
    jan, feb = T("2025-01-20T10:00:00Z"), T("2025-02-10T10:00:00Z")
    tenant.usage(
        "acme-1",
        [("api", jan + (i % 5) * m, {}) for i in range(500)]
        + [("storage", jan, {"gb": "10"}), ("storage", jan + m, {"gb": "3"})],
    )
    tenant.usage(
        "acme-1",
        [("api", feb + (i % 5) * m, {}) for i in range(1500)] + [("storage", feb, {"gb": "4"})],
    )
    # Usage during the grace hour after Feb closes is Feb's.
    tenant.usage("acme-1", [("api", T("2025-02-28T23:59:00Z"), {})])

    out = await call(client, tenant, "POST", "/v1/invoices/run", {"as_of": "2025-03-01T01:00:00Z"})
    assert out["existing"] == 0 and len(out["created"]) == 2, out
    data = (await call(client, tenant, "GET", "/v1/invoices?customer_id=acme-1"))["data"]
    jan_inv, feb_inv = data
    # January: the subscription starts on Jan 15 -> the fee for the remaining 17 of 31 days:
    #   30 * 17/31 = 16.4516.. -> 16.45; api 500: 100*0 + 400*0.02 = 8.00; storage max 10 * 0.25
    #   = 2.50. Subtotal 26.95; VAT 20% per line 3.29 + 1.60 + 0.50 = 5.39; total 32.34.
    assert lines(jan_inv) == [
        ("proration", "base", "16.45"),
        ("usage", "api", "8.00"),
        ("usage", "storage", "2.50"),
    ]
    assert (jan_inv["subtotal"], jan_inv["tax"], jan_inv["total"]) == ("26.95", "5.39", "32.34")
    # February: fee 30.00; api 1501: 900*0.02 + 501*0.01 = 23.01; storage 4 * 0.25 = 1.00.
    #   Subtotal 54.01; VAT 6.00 + 4.60 + 0.20 = 10.80; total 64.81.
    assert lines(feb_inv) == [
        ("fixed", "base", "30.00"),
        ("usage", "api", "23.01"),
        ("usage", "storage", "1.00"),
    ]
    assert (feb_inv["subtotal"], feb_inv["tax"], feb_inv["total"]) == ("54.01", "10.80", "64.81")
    assert jan_inv["status"] == "draft" and jan_inv["number"] is None
    assert jan_inv["subscription_id"] == sub_id

    # Finalize: gapless numbers in finalization order.
    f1 = await call(client, tenant, "POST", f"/v1/invoices/{feb_inv['id']}/finalize")
    f2 = await call(client, tenant, "POST", f"/v1/invoices/{jan_inv['id']}/finalize")
    assert (f1["number"], f2["number"]) == ("INV-000001", "INV-000002")
    assert f1["status"] == "finalized" and f1["total"] == "64.81"
    r = await call(client, tenant, "POST", f"/v1/invoices/{feb_inv['id']}/finalize", status=409)
    assert "already finalized" in r["message"] and isinstance(r["details"], list)

    # Run again: nothing new.
    again = await call(
        client, tenant, "POST", "/v1/invoices/run", {"as_of": "2025-03-01T01:00:00Z"}
    )
    assert again == {"created": [], "existing": 2, "finalized": [], "credit_notes": []}

    # A late event for closed, finalized February: +100 api calls -> 1601: 23.01 -> 24.01.
    tenant.usage("acme-1", [("api", feb, {}) for _ in range(100)])
    # The upcoming invoice (as of mid-March) shows the adjustment until it is invoiced.
    up = services.invoicing.upcoming_invoice(tenant.id, "acme-1", T("2025-03-15T00:00:00Z"))
    assert ("adjustment", "api", "1.00") in [
        (ln.kind.value, ln.charge_key, str(ln.amount)) for ln in up.lines
    ]
    out = await call(client, tenant, "POST", "/v1/invoices/run", {"as_of": "2025-04-01T01:00:00Z"})
    assert len(out["created"]) == 1 and out["existing"] == 2
    mar = await call(client, tenant, "GET", f"/v1/invoices/{out['created'][0]}")
    # March: fee 30.00, no usage (api 0.00 in the free tier, storage 0.00), and the adjustment
    # for February's late 100 calls: +1.00 (naming February). Subtotal 31.00; VAT 6.00 + 0.20.
    assert lines(mar) == [
        ("fixed", "base", "30.00"),
        ("usage", "api", "0.00"),
        ("usage", "storage", "0.00"),
        ("adjustment", "api", "1.00"),
    ]
    adj = mar["lines"][3]
    assert adj["period_start"].startswith("2025-02-01") and adj["period_end"].startswith(
        "2025-03-01"
    )
    assert "2025-02-01 to 2025-03-01" in adj["description"] and adj["quantity"] == "100"
    assert (mar["subtotal"], mar["tax"], mar["total"]) == ("31.00", "6.20", "37.20")

    # Void the March draft with a replacement; the replacement carries the adjustment again.
    voided = await call(
        client,
        tenant,
        "POST",
        f"/v1/invoices/{mar['id']}/void",
        {"reason": "wrong address", "replace": True},
    )
    assert voided["status"] == "void" and voided["replaced_by"]
    repl = await call(client, tenant, "GET", f"/v1/invoices/{voided['replaced_by']}")
    assert repl["total"] == "37.20" and repl["replaces"] == mar["id"] and repl["revision"] == 1
    r = await call(client, tenant, "POST", f"/v1/invoices/{mar['id']}/void", {"reason": "x"}, 409)
    assert "already void" in r["message"]

    # Credit note on February, one line (the api line, 23.01), with its own number.
    note = await call(
        client,
        tenant,
        "POST",
        f"/v1/invoices/{feb_inv['id']}/credit-notes",
        {"reason": "goodwill", "lines": [{"line": 1}]},
        201,
    )
    assert note["number"] == "CN-000001" and note["invoice_id"] == feb_inv["id"]
    # 23.01 credited + VAT 4.60 = 27.61
    assert (note["subtotal"], note["tax"], note["total"]) == ("23.01", "4.60", "27.61")
    r = await call(
        client,
        tenant,
        "POST",
        f"/v1/invoices/{feb_inv['id']}/credit-notes",
        {"reason": "again", "lines": [{"line": 1}]},
        400,
    )
    assert r["details"][0]["field"] == "lines.0.line"
    feb_now = await call(client, tenant, "GET", f"/v1/invoices/{feb_inv['id']}")
    assert feb_now["credited"] == "27.61" and feb_now["total"] == "64.81"
    r = await call(
        client, tenant, "POST", f"/v1/invoices/{feb_inv['id']}/void", {"reason": "x"}, 409
    )
    assert "credit notes" in r["message"]

    # Audit trail per object.
    trail = (
        await call(
            client, tenant, "GET", f"/v1/audit?object_type=invoice&object_id={feb_inv['id']}"
        )
    )["data"]
    assert [a["action"] for a in trail] == ["created", "finalized"]
    assert all(a["actor"].startswith("api_key:tly_") for a in trail)


async def test_auto_finalize_discounts_and_inclusive_tax(
    client: httpx.AsyncClient, tenant: Tenant, store: Any, tmp_path: Any
) -> None:
    from api.billing_state import build_services
    from tally.settings import Settings

    svc = build_services(
        Settings.model_validate(
            {"data_dir": tmp_path / "d", "billing_tasks": False, "invoice_auto_finalize": True}
        ),
        store,
    )
    client._transport.app.state.billing = svc  # type: ignore[attr-defined]
    await call(client, tenant, "POST", "/v1/plans", PLAN, 201)
    for ext, inclusive in (("net", False), ("gross", True)):
        await call(
            client,
            tenant,
            "POST",
            "/v1/customers",
            {
                "external_id": ext,
                "name": ext.title(),
                "currency": "USD",
                "tax_rates": {"VAT": "20"},
                "tax_inclusive": inclusive,
            },
            201,
        )
        await call(
            client,
            tenant,
            "POST",
            "/v1/subscriptions",
            {"customer_id": ext, "plan_code": "std", "start_at": "2025-02-01T00:00:00Z"},
            201,
        )
    d = await call(
        client,
        tenant,
        "POST",
        "/v1/customers/net/discounts",
        {"percentage": "50", "charge_key": "base", "expires_at": "2025-03-01T00:00:00Z"},
        201,
    )
    bad = await call(
        client,
        tenant,
        "POST",
        "/v1/customers/net/discounts",
        {"percentage": "5", "amount": "1"},
        400,
    )
    assert bad["details"][0]["field"] == "body"
    out = await call(client, tenant, "POST", "/v1/invoices/run", {"as_of": "2025-04-01T01:00:00Z"})
    assert len(out["created"]) == 4 and sorted(out["finalized"]) == sorted(out["created"])
    invs = (await call(client, tenant, "GET", "/v1/invoices?status=finalized"))["data"]
    assert sorted(i["number"] for i in invs) == [f"INV-00000{n}" for n in range(1, 5)]
    by = {(i["customer_id"], i["period_start"][:7]): i for i in invs}
    # net, February: base 30.00 - 50 % = 15.00; VAT 20 % on top: 3.00 -> 18.00
    feb = by[("net", "2025-02")]
    assert [(ln["kind"], ln["amount"]) for ln in feb["lines"]][-1] == ("discount", "-15.00")
    assert (feb["subtotal"], feb["tax"], feb["total"]) == ("15.00", "3.00", "18.00")
    # The discount expired on March 1: March is full price.
    assert by[("net", "2025-03")]["total"] == "36.00"
    assert by[("net", "2025-02")]["contract"]["discounts"][0]["id"] == d["id"]
    # gross: prices include VAT: 30.00 of which 5.00 VAT, net 25.00.
    g = by[("gross", "2025-02")]
    assert (g["subtotal"], g["tax"], g["total"], g["tax_inclusive"]) == (
        "25.00",
        "5.00",
        "30.00",
        True,
    )


async def test_replacement_after_void_nets_out_adjustments_billed_elsewhere(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    """February was finalized, then late usage for it was billed as an adjustment on March's
    finalized invoice. Voiding February with a replacement re-rates February in full and takes
    the adjustment already billed on March off again: the period is billed once, to the cent."""
    await call(client, tenant, "POST", "/v1/plans", PLAN, 201)
    await setup_customer(client, tenant)
    feb = T("2025-02-10T10:00:00Z")
    tenant.usage("acme-1", [("api", feb, {})] * 1501 + [("storage", feb, {"gb": "4"})])
    await call(client, tenant, "POST", "/v1/invoices/run", {"as_of": "2025-03-01T01:00:00Z"})
    invs = (await call(client, tenant, "GET", "/v1/invoices"))["data"]
    f1 = next(i for i in invs if i["period_start"].startswith("2025-02"))
    f1 = await call(client, tenant, "POST", f"/v1/invoices/{f1['id']}/finalize")
    assert (f1["number"], f1["total"]) == ("INV-000001", "64.81")
    # 100 late calls for February: March carries +1.00 (+0.20 VAT) for it.
    tenant.usage("acme-1", [("api", feb, {})] * 100)
    out = await call(client, tenant, "POST", "/v1/invoices/run", {"as_of": "2025-04-01T01:00:00Z"})
    mar = await call(client, tenant, "POST", f"/v1/invoices/{out['created'][0]}/finalize")
    assert lines(mar)[-1] == ("adjustment", "api", "1.00") and mar["total"] == "37.20"

    voided = await call(
        client, tenant, "POST", f"/v1/invoices/{f1['id']}/void", {"reason": "x", "replace": True}
    )
    repl = await call(client, tenant, "GET", f"/v1/invoices/{voided['replaced_by']}")
    # February in full: 30.00 + 1601 calls (900*0.02 + 601*0.01 = 24.01) + storage 1.00, less the
    # 1.00 already billed on INV-000002: subtotal 54.01; VAT 6.00 + 4.80 + 0.20 - 0.20 = 10.80.
    assert lines(repl) == [
        ("fixed", "base", "30.00"),
        ("usage", "api", "24.01"),
        ("usage", "storage", "1.00"),
        ("adjustment", "api", "-1.00"),
    ]
    assert "INV-000002" in repl["lines"][3]["description"]
    assert repl["lines"][3]["quantity"] == "-100"
    assert (repl["subtotal"], repl["tax"], repl["total"]) == ("54.01", "10.80", "64.81")
    # Everything billed for February = what February's usage costs: 55.01 + VAT 11.00.
    assert Decimal(repl["total"]) + Decimal("1.20") == Decimal("66.01")

    # Finalizing re-rates the draft: still netted. Later runs bill February nothing more.
    fin = await call(client, tenant, "POST", f"/v1/invoices/{repl['id']}/finalize")
    assert (fin["number"], fin["total"]) == ("INV-000003", "64.81")
    out = await call(client, tenant, "POST", "/v1/invoices/run", {"as_of": "2025-05-01T01:00:00Z"})
    apr = await call(client, tenant, "GET", f"/v1/invoices/{out['created'][0]}")
    assert [k for k, _, _ in lines(apr)] == ["fixed", "usage", "usage"]
    assert out["credit_notes"] == []

    # A replacement of the replacement nets the same adjustment (through the chain).
    v2 = await call(
        client, tenant, "POST", f"/v1/invoices/{fin['id']}/void", {"reason": "y", "replace": True}
    )
    r2 = await call(client, tenant, "GET", f"/v1/invoices/{v2['replaced_by']}")
    assert lines(r2)[-1] == ("adjustment", "api", "-1.00") and r2["total"] == "64.81"
    assert r2["revision"] == 2 and r2["replaces"] == fin["id"]
