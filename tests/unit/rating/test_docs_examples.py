"""Every worked example in docs/pricing.md is executed here, so the docs match the code."""

from __future__ import annotations

import json
import re
from datetime import date, datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import pytest

from rating import (
    LineKind,
    Period,
    invoice_totals,
    make_line,
    period_containing,
    prorated_charge,
    rate_charge,
)
from schemas.pricing import parse_price

DOC = Path(__file__).resolve().parents[3] / "docs" / "pricing.md"
BLOCK = re.compile(r"```json ([a-z-]+)\n(.*?)```", re.DOTALL)


def _examples(kind: str) -> list[Any]:
    found = [json.loads(body) for k, body in BLOCK.findall(DOC.read_text()) if k == kind]
    return [pytest.param(e, id=f"{kind}-{i}") for i, e in enumerate(found)]


def test_docs_have_examples_of_every_kind() -> None:
    kinds = [k for k, _ in BLOCK.findall(DOC.read_text())]
    assert kinds.count("price-example") >= 14
    for kind in ("invoice-example", "period-example", "proration-example"):
        assert kind in kinds
    models = {
        json.loads(b)["price"]["model"]
        for k, b in BLOCK.findall(DOC.read_text())
        if k == "price-example"
    }
    assert models == {
        "flat",
        "per_unit",
        "graduated",
        "volume",
        "package",
        "staircase",
        "percentage",
    }


@pytest.mark.parametrize("ex", _examples("price-example"))
def test_price_example(ex: dict[str, Any]) -> None:
    events = ex.get("event_amounts")
    line = rate_charge(
        parse_price(ex["price"]),
        D(ex["quantity"]),
        event_amounts=[D(a) for a in events] if events is not None else None,
        event_count=ex.get("event_count"),
    )
    assert str(line.amount) == ex["amount"]


@pytest.mark.parametrize("ex", _examples("invoice-example"))
def test_invoice_example(ex: dict[str, Any]) -> None:
    lines = [make_line(LineKind.USAGE, D(a), ex["currency"]) for a in ex["lines"]]
    rates = {k: D(v) for k, v in ex["tax_rates"].items()}
    totals = invoice_totals(lines, rates)
    assert [str(x) for x in totals] == [ex["subtotal"], ex["tax"], ex["total"]]


def _t(s: str) -> datetime:
    return datetime.fromisoformat(s)


@pytest.mark.parametrize("ex", _examples("period-example"))
def test_period_example(ex: dict[str, Any]) -> None:
    anchor = date.fromisoformat(ex["anchor"]) if ex["anchor"] else None
    p = period_containing(anchor, ex["interval"], _t(ex["at"]), ex["tz"], ex["alignment"])
    assert p == Period(_t(ex["start"]), _t(ex["end"]))


@pytest.mark.parametrize("ex", _examples("proration-example"))
def test_proration_example(ex: dict[str, Any]) -> None:
    period = Period(_t(ex["period"][0]), _t(ex["period"][1]))
    line = prorated_charge(
        parse_price(ex["price"]),
        D(ex["quantity"]),
        ex["currency"],
        period,
        _t(ex["used_from"]),
        _t(ex["used_to"]),
    )
    assert str(line.amount) == ex["amount"]
