"""Wrappers (free units, minimum, maximum) and properties that hold across all models."""

from __future__ import annotations

from decimal import Decimal as D
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rating.engine import rate, rate_model
from schemas.pricing import FlatPrice, GraduatedPrice, PercentagePrice, PerUnitPrice, Tier
from tally.errors import ValidationError
from tests.unit.rating.strategies import (
    flat_prices,
    graduated_prices,
    package_prices,
    per_unit_prices,
    percentage_prices,
    quantities,
    staircase_prices,
    volume_prices,
)


def test_minimum_and_maximum() -> None:
    spec = PerUnitPrice(unit_amount=D(1), minimum=D(10), maximum=D(50))
    assert rate(spec, D(3)).amount == D(10)
    assert rate(spec, D(30)).amount == D(30)
    assert rate(spec, D(300)).amount == D(50)
    assert rate_model(spec, D(300)).amount == D(300)
    assert rate(spec, D(3)).parts[-1].label == "minimum commitment"
    assert rate(spec, D(300)).parts[-1].amount == D(-250)


def test_parts_add_up_with_wrappers() -> None:
    spec = GraduatedPrice(
        tiers=[Tier(up_to=D(10), unit_amount=D(1)), Tier(up_to=None, unit_amount=D(2))],
        free_units=D(5),
        maximum=D(20),
    )
    r = rate(spec, D(30))
    assert r.amount == D(20)
    assert sum((p.amount for p in r.parts), D(0)) == r.amount


def test_percentage_dispatch_checks_inputs() -> None:
    spec = PercentagePrice(rate=D(10), fixed_amount=D(1))
    assert rate(spec, D(30), event_amounts=[D(10), D(20)]).amount == D(5)
    assert rate(spec, D(30), event_count=2).amount == D(5)
    with pytest.raises(ValidationError) as err:
        rate(spec, D(31), event_amounts=[D(10), D(20)])
    assert [d["field"] for d in err.value.details] == ["quantity"]
    with pytest.raises(ValidationError):
        rate(spec, D(30), event_amounts=[D(10), D(20)], event_count=3)


def test_non_decimal_quantity_refused() -> None:
    with pytest.raises(ValidationError):
        rate(FlatPrice(amount=D(1)), 1.5)  # type: ignore[arg-type]


# Every model with non-negative prices is non-decreasing in quantity — except that volume and
# staircase prices may discount at a higher band (see test_volume_is_not_monotonic_in_general),
# so for those two the property is checked on specs whose bands never get cheaper.
monotone_prices = st.one_of(
    flat_prices(),
    per_unit_prices(),
    graduated_prices(),
    volume_prices(non_decreasing=True),
    package_prices(),
    staircase_prices(non_decreasing=True),
    percentage_prices(per_event_bounds=False),
)


@given(price=monotone_prices, a=quantities, b=quantities, n=st.integers(0, 50))
def test_amount_non_decreasing_in_quantity(price: Any, a: D, b: D, n: int) -> None:
    lo, hi = min(a, b), max(a, b)
    assert rate(price, lo, event_count=n).amount <= rate(price, hi, event_count=n).amount


@given(price=monotone_prices, q=quantities, n=st.integers(0, 50))
def test_amount_within_commitments(price: Any, q: D, n: int) -> None:
    amount = rate(price, q, event_count=n).amount
    assert amount >= 0
    if price.minimum is not None:
        assert amount >= price.minimum
    if price.maximum is not None:
        assert amount <= price.maximum
