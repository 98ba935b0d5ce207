"""Reconciliation against stored invoices (JSON and CSV), and event corrections reflected in
usage queries and invoices (a void after finalization becomes a credit note)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from .conftest import Tenant
from .test_invoicing import PLAN, call, setup_customer

pytestmark = pytest.mark.anyio


async def test_reconciliation_report_on_crafted_sets(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    await call(client, tenant, "POST", "/v1/plans", PLAN, 201)
    await setup_customer(client, tenant, "a")
    await setup_customer(client, tenant, "b")
    feb = datetime(2025, 2, 10, tzinfo=UTC)
    tenant.usage("a", [("api", feb, {})] * 1500 + [("storage", feb, {"gb": "4"})])
    tenant.usage("b", [("api", feb, {})] * 200)
    await call(client, tenant, "POST", "/v1/invoices/run", {"as_of": "2025-03-01T01:00:00Z"})
    # Tally, February: a: base 30.00, api 1500 -> 23.00, storage 1.00;
    #                  b: base 30.00, api 200 -> 2.00, storage 0.00 (quantity 0)
    other = [
        {"customer_id": "a", "charge": "base", "quantity": "1", "amount": "30.00"},
        {"customer_id": "a", "charge": "api", "quantity": "1500", "amount": "23.00"},
        {"customer_id": "a", "charge": "storage", "quantity": "4", "amount": "1.00"},
        {"customer_id": "b", "charge": "base", "quantity": "1", "amount": "30.00"},
        {"customer_id": "b", "charge": "api", "quantity": "250", "amount": "3.00"},  # quantity
        {"customer_id": "c", "charge": "base", "quantity": "1", "amount": "30.00"},  # extra
    ]  # b/storage missing on their side
    body = {
        "period_start": "2025-02-01T00:00:00Z",
        "period_end": "2025-03-01T00:00:00Z",
        "lines": other,
    }
    r = await call(client, tenant, "POST", "/v1/reconciliations", body)
    by = {(ln["customer_id"], ln["charge"]): ln["status"] for ln in r["lines"]}
    assert by == {
        ("a", "base"): "matched",
        ("a", "api"): "matched",
        ("a", "storage"): "matched",
        ("b", "base"): "matched",
        ("b", "api"): "quantity_mismatch",
        ("b", "storage"): "missing",
        ("c", "base"): "extra",
    }
    assert r["counts"]["matched"] == 4 and r["match_rate"] == "57.14"
    assert (r["tally_total"], r["other_total"], r["difference"]) == ("86.00", "117.00", "-31.00")
    # The same import as CSV, answered as CSV.
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["customer_id", "charge", "quantity", "amount"])
    w.writeheader()
    w.writerows(other)
    resp = await client.post(
        "/v1/reconciliations?period_start=2025-02-01T00:00:00Z&period_end=2025-03-01T00:00:00Z&format=csv",
        content=buf.getvalue().encode(),
        headers={**tenant.headers, "Content-Type": "text/csv"},
    )
    assert resp.status_code == 200, resp.text
    rows = list(csv.reader(io.StringIO(resp.text)))
    assert rows[0][:4] == ["customer_id", "charge", "group", "status"]
    assert ["b", "storage", "", "missing"] == rows[[r[:2] for r in rows].index(["b", "storage"])][
        :4
    ]
    assert rows[-1][3] == "match_rate=57.14"
    bad = await client.post(
        "/v1/reconciliations",
        json={**body, "lines": [{"charge": "x", "amount": "1"}]},
        headers=tenant.headers,
    )
    assert bad.status_code == 400 and bad.json()["details"][0]["field"].startswith("lines.0")


async def test_void_event_after_finalize_gives_a_credit_note_and_fixes_usage(
    client: httpx.AsyncClient, tenant: Tenant, store: Any
) -> None:
    from clickhouse.sink import EVENTS_COLUMNS

    await call(client, tenant, "POST", "/v1/plans", PLAN, 201)
    await setup_customer(client, tenant)
    t = datetime(2025, 2, 10, 12, 0, 30, tzinfo=UTC)
    tenant.usage("acme-1", [("api", t, {})] * 1500)
    # The ledger row of one of those calls (the worker writes both; here the test does).
    now = datetime.now(UTC)
    store.insert(
        "events",
        [(tenant.id, "ev-big", "api_call", "acme-1", t, "{}", now, "x", 0, 0, 0)],
        EVENTS_COLUMNS,
    )
    out = await call(client, tenant, "POST", "/v1/invoices/run", {"as_of": "2025-03-01T01:00:00Z"})
    feb = next(
        i
        for i in (await call(client, tenant, "GET", "/v1/invoices"))["data"]
        if i["period_start"].startswith("2025-02")
    )
    await call(client, tenant, "POST", f"/v1/invoices/{feb['id']}/finalize")
    assert [ln["amount"] for ln in feb["lines"]][:2] == ["30.00", "23.00"] and out

    cor = await call(
        client,
        tenant,
        "POST",
        "/v1/events/ev-big/corrections",
        {"action": "void", "reason": "test traffic"},
        201,
    )
    assert cor["applied_meters"] == ["api"] and cor["action"] == "void"
    r = await call(
        client,
        tenant,
        "POST",
        "/v1/events/ev-big/corrections",
        {"action": "void", "reason": "again"},
        409,
    )
    assert "already void" in r["message"]
    usage = await call(
        client,
        tenant,
        "GET",
        "/v1/meters/api/usage?from=2025-02-01T00:00:00Z&to=2025-03-01T00:00:00Z",
    )
    assert [row["value"] for row in usage["data"]] == ["1499"]
    # 1499 calls: 900*0.02 + 499*0.01 = 22.99 -> down 0.01: a credit note (VAT 20% on -0.01 = 0.00)
    out = await call(client, tenant, "POST", "/v1/invoices/run", {"as_of": "2025-03-01T01:00:00Z"})
    assert out["created"] == [] and len(out["credit_notes"]) == 1
    notes = (await call(client, tenant, "GET", f"/v1/invoices/{feb['id']}/credit-notes"))["data"]
    assert [(n["number"], n["total"], n["automatic"]) for n in notes] == [
        ("CN-000001", "0.01", True)
    ]
    assert notes[0]["lines"][0]["period_start"].startswith("2025-02-01")
    again = await call(
        client, tenant, "POST", "/v1/invoices/run", {"as_of": "2025-03-01T01:00:00Z"}
    )
    assert again["credit_notes"] == []  # issued once
    hist = (await call(client, tenant, "GET", "/v1/events/ev-big/corrections"))["data"]
    assert len(hist) == 1 and hist[0]["reason"] == "test traffic"
    trail = (await call(client, tenant, "GET", "/v1/audit?object_type=event&object_id=ev-big"))[
        "data"
    ]
    assert trail[0]["action"] == "correction.void"
    assert (
        timedelta(0)
        <= datetime.now(UTC) - datetime.fromisoformat(trail[0]["at"])
        < timedelta(hours=1)
    )
