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
