"""Every worked example in docs/invoicing.md is executed here, so the docs match the code."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from billing.reconcile import diff
from rating.adjustments import Billed, key_of, late_adjustments
from rating.discounts import DiscountSpec, discount_lines
from rating.lines import make_line, rate_charge
from rating.tax import document_totals
from schemas.billing import ExternalLine
from schemas.pricing import LineKind, parse_price

DOC = Path(__file__).resolve().parents[3] / "docs" / "invoicing.md"
BLOCK = re.compile(r"```json ([a-z-]+)\n(.*?)```", re.DOTALL)
P0, P1 = datetime(2025, 2, 1, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)


def _examples(kind: str) -> list[Any]:
    found = [json.loads(body) for k, body in BLOCK.findall(DOC.read_text()) if k == kind]
    assert found, f"no {kind} blocks in {DOC}"
    return found


@pytest.mark.parametrize("ex", _examples("invoice-doc-example"))
def test_invoice_doc_examples(ex: dict[str, Any]) -> None:
    cur = ex["currency"]
    lines = [
        make_line(LineKind(ln["kind"]), D(ln["amount"]), cur, charge_key=ln.get("charge_key"))
        for ln in ex["lines"]
    ]
    specs = [
        DiscountSpec(
            d["id"],
            percentage=D(d["percentage"]) if "percentage" in d else None,
            amount=D(d["amount"]) if "amount" in d else None,
            charge_key=d.get("charge_key"),
        )
        for d in ex["discounts"]
    ]
    disc = discount_lines(lines, specs, cur)
    assert [str(d.amount) for d in disc] == ex["discount_amounts"]
    rates = {k: D(v) for k, v in ex["tax_rates"].items()}
    t = document_totals([*lines, *disc], rates, cur, inclusive=ex["tax_inclusive"])
    assert (str(t.subtotal), str(t.tax), str(t.total)) == (ex["subtotal"], ex["tax"], ex["total"])


@pytest.mark.parametrize("ex", _examples("adjustment-example"))
def test_adjustment_examples(ex: dict[str, Any]) -> None:
    price = parse_price(ex["price"])

    def rated(q: str) -> Any:
        return rate_charge(
            price, D(q), kind=LineKind.USAGE, charge_key="api", period_start=P0, period_end=P1
        )

    old = rated(ex["billed_quantity"])
    assert str(old.amount) == ex["billed_amount"]
    billed = {key_of(old): Billed(old.quantity, old.amount, old)}
    adj = late_adjustments([rated(ex["live_quantity"])], billed, "USD", "February")
    assert len(adj) == 1
    line = adj[0][1]
    assert (str(line.quantity), str(line.amount)) == (
        ex["adjustment_quantity"],
        ex["adjustment_amount"],
    )
    assert line.period_start == P0 and "February" in line.description


@pytest.mark.parametrize("ex", _examples("reconcile-example"))
def test_reconcile_examples(ex: dict[str, Any]) -> None:
    def lines(rows: list[list[Any]]) -> list[ExternalLine]:
        return [
            ExternalLine(customer_id=c, charge=ch, amount=D(a), quantity=D(q) if q else None)
            for c, ch, a, q in rows
        ]

    r = diff(lines(ex["tally"]), lines(ex["other"]), P0, P1)
    assert {f"{ln.customer_id}/{ln.charge}": ln.status.value for ln in r.lines} == ex["statuses"]
    assert (str(r.match_rate), str(r.difference)) == (ex["match_rate"], ex["difference"])


@pytest.mark.parametrize("ex", _examples("replacement-example"))
def test_replacement_examples(ex: dict[str, Any]) -> None:
    from billing.compose import netting_lines
    from schemas.billing import InvoiceLine

    cur = ex["currency"]
    lines = [
        make_line(
            LineKind(ln["kind"]),
            D(ln["amount"]),
            cur,
            quantity=D(ln.get("quantity", "1")),
            charge_key=ln.get("charge_key"),
        )
        for ln in ex["lines"]
    ]
    elsewhere = [
        (
            b["number"],
            InvoiceLine(
                kind="adjustment",
                description="Late usage: API calls for February",
                quantity=D(b["quantity"]),
                amount=D(b["amount"]),
                currency=cur,
                charge_key=b["charge_key"],
                key="usage|api",
                adjusts="inv_feb",
            ),
        )
        for b in ex["billed_elsewhere"]
    ]
    netted = netting_lines(elsewhere, cur)
    assert [str(ln.amount) for ln, _, _ in netted] == ex["netting_amounts"]
    assert all(adj == "inv_feb" and ln.kind is LineKind.ADJUSTMENT for ln, _, adj in netted)
    assert all(
        b["number"] in ln.description
        for (ln, _, _), b in zip(netted, ex["billed_elsewhere"], strict=True)
    )
    rates = {k: D(v) for k, v in ex["tax_rates"].items()}
    t = document_totals([*lines, *(ln for ln, _, _ in netted)], rates, cur)
    assert (str(t.subtotal), str(t.tax), str(t.total)) == (ex["subtotal"], ex["tax"], ex["total"])
    elsewhere_total = sum(
        (
            D(b["amount"])
            + document_totals([make_line(LineKind.ADJUSTMENT, D(b["amount"]), cur)], rates, cur).tax
            for b in ex["billed_elsewhere"]
        ),
        D(0),
    )
    assert str(t.total + elsewhere_total) == ex["period_total_across_documents"]


@pytest.mark.parametrize("ex", _examples("correction-example"))
def test_correction_examples(ex: dict[str, Any]) -> None:
    """The worker's matching and minute aggregation recompute the window (min/max/unique/latest)
    or the deltas correct it (count/sum/avg), as ``billing.corrections`` does."""
    from api.matching import WorkerMatching
    from billing.corrections import effects
    from schemas.corrections import ADDITIVE, LedgerEvent
    from schemas.meters import Aggregation, Meter
    from schemas.timeutil import epoch_ms

    meter = Meter.model_validate(
        {**ex["meter"], "id": "m1", "tenant_id": "t", "event_type": "up", "created_at": P0}
    )
    events = [
        LedgerEvent(
            eid, "up", "c", epoch_ms(datetime.fromisoformat(at)), {"gb": gb}, "tally.events", 0, 5
        )
        for eid, at, gb in ex["events"]
    ]
    fixes: dict[str, Any] = {}
    for eid, props in ex["corrections"]:
        fixes[eid] = props
    m = WorkerMatching()

    def value(fixed: dict[str, Any]) -> D:
        items = [(e, fixed[e.id] if e.id in fixed else e.properties) for e in events]
        (agg,) = m.windows(meter, items, {}).values()
        if meter.aggregation is Aggregation.MAX:
            assert agg.value_max is not None
            return agg.value_max.normalize()
        return (agg.value_sum / agg.value_count).quantize(D("0.000000001")).normalize()

    assert str(value({})) == ex["before"]
    assert str(value(fixes)) == ex["after"]
    if meter.aggregation in ADDITIVE:
        ((eid, after),) = ex["corrections"]
        e = next(x for x in events if x.id == eid)
        before_c = m.contributions([meter], e, e.properties, {})
        after_c = m.contributions([meter], e, after, {}) if after is not None else []
        (delta,) = effects("c", e.time_ms, before_c, after_c)
        want = ex["delta"]
        assert (delta.events, delta.value_count, str(delta.value_sum.normalize())) == (
            want["events"],
            want["value_count"],
            want["value_sum"],
        )
        assert delta.side == "s"  # a meter without activation markers: the stream counts it
