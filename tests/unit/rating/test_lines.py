from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal as D

import pytest

from rating.lines import invoice_totals, make_line, rate_charge, rate_charge_lines
from schemas.pricing import FlatPrice, LineItem, LineKind, PercentagePrice, PerUnitPrice
from tally.errors import ValidationError


def test_rate_charge_rounds_once() -> None:
    line = rate_charge(PerUnitPrice(unit_amount=D("0.0015")), D(333), "usd")
    assert line.currency == "USD" and line.amount == D("0.50") and line.exact_amount == "0.4995"
    assert line.kind is LineKind.USAGE
    assert rate_charge(FlatPrice(amount=D(5)), D(0), "JPY").kind is LineKind.FIXED


def test_currency_rules() -> None:
    with pytest.raises(ValidationError) as err:
        rate_charge(FlatPrice(amount=D(1), currency="EUR"), D(1), "USD")
    assert [d["field"] for d in err.value.details] == ["currency"]
    with pytest.raises(ValidationError):
        rate_charge(FlatPrice(amount=D(1)), D(1))  # no currency anywhere
    with pytest.raises(ValidationError):
        rate_charge(FlatPrice(amount=D(1)), D(1), "ZZZ")


def test_minimum_adjustment_line() -> None:
    spec = PerUnitPrice(unit_amount=D("0.333"), minimum=D(10))
    one = rate_charge(spec, D(3), "USD")
    lines = rate_charge_lines(spec, D(3), "USD")
    assert [ln.kind for ln in lines] == [LineKind.USAGE, LineKind.MINIMUM_ADJUSTMENT]
    assert [ln.amount for ln in lines] == [D("1.00"), D("9.00")]
    assert sum(ln.amount for ln in lines) == one.amount == D("10.00")
    assert rate_charge_lines(spec, D(100), "USD")[0].amount == D("33.30")
    assert len(rate_charge_lines(spec, D(100), "USD")) == 1


def test_line_json_round_trip() -> None:
    line = rate_charge(
        PercentagePrice(rate=D("2.9"), fixed_amount=D("0.3")),
        D(150),
        "EUR",
        event_amounts=[D(100), D(50)],
        charge_key="payments",
        meter_slug="tx-amount",
        group={"region": "eu"},
        period_start=datetime(2024, 6, 1, tzinfo=UTC),
        period_end=datetime(2024, 7, 1, tzinfo=UTC),
    )
    assert line.amount == D("4.95")
    text = line.model_dump_json()
    assert '"amount":"4.95"' in text
    assert LineItem.model_validate_json(text) == line


def _line(amount: str, currency: str = "USD") -> LineItem:
    return make_line(LineKind.USAGE, D(amount), currency)


def test_invoice_totals_tax_rounded_per_line() -> None:
    lines = [_line("0.05"), _line("0.05"), _line("10.00"), _line("-2.00")]
    totals = invoice_totals(lines, {"VAT": D("10")})
    # per-line tax: 0.005 -> 0.01, 0.01, 1.00, -0.20  => 0.82 (per-invoice would be 0.81)
    assert totals == (D("8.10"), D("0.82"), D("8.92"))
    subtotal, tax, total = invoice_totals(lines, [D("10"), D("5")])
    # 5 %: 0.0025 -> 0.00 (twice), 0.50, -0.10
    assert tax == D("0.82") + D("0.00") * 2 + D("0.50") - D("0.10")
    assert total == subtotal + tax


def test_invoice_totals_currency_rules() -> None:
    with pytest.raises(ValidationError):
        invoice_totals([_line("1", "USD"), _line("1", "EUR")])
    with pytest.raises(ValidationError):
        invoice_totals([])
    assert invoice_totals([], currency="JPY") == (D(0), D(0), D(0))
    assert str(invoice_totals([], currency="KWD").total) == "0.000"
