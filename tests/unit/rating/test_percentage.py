from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rating.percentage import rate_percentage, rate_percentage_total
from schemas.pricing import PercentagePrice
from tally.errors import ValidationError
from tests.unit.rating.strategies import percentage_prices

amounts = st.lists(st.decimals(min_value=0, max_value=10_000, places=2), max_size=20)


def test_rate_plus_fixed_fee_per_event() -> None:
    spec = PercentagePrice(rate=D("2.9"), fixed_amount=D("0.30"))
    r = rate_percentage(spec, [D(100), D(50)])
    assert r.amount == D("2.90") + D("1.45") + D("0.60")


def test_per_event_min_and_max() -> None:
    spec = PercentagePrice(rate=D(1), min_per_event=D("0.50"), max_per_event=D(5))
    # fees: 0.10 -> 0.50 (min), 2.00, 20.00 -> 5 (max)
    r = rate_percentage(spec, [D(10), D(200), D(2000)])
    assert r.amount == D("7.50")
    assert r.amount == sum((p.amount for p in r.parts), D(0))


def test_free_units_consumed_by_earliest_events() -> None:
    spec = PercentagePrice(rate=D(10), free_units=D(150), min_per_event=D(1))
    # event 1 (100) fully free -> fee 0 -> min 1; event 2: 50 free, 50 charged -> 5; event 3 -> 10
    assert rate_percentage(spec, [D(100), D(100), D(100)]).amount == D(16)


def test_total_form() -> None:
    spec = PercentagePrice(rate=D("2.5"), fixed_amount=D("0.25"), free_units=D(100))
    assert rate_percentage_total(spec, D(1100), 4).amount == D(25) + D(1)


def test_total_form_refuses_per_event_bounds_and_missing_count() -> None:
    with pytest.raises(ValidationError) as err:
        rate_percentage_total(PercentagePrice(rate=D(1), max_per_event=D(1)), D(10), 1)
    assert [d["field"] for d in err.value.details] == ["event_amounts"]
    with pytest.raises(ValidationError) as err:
        rate_percentage_total(PercentagePrice(rate=D(1), fixed_amount=D(1)), D(10))
    assert [d["field"] for d in err.value.details] == ["event_count"]


def test_negative_event_amount_is_refused() -> None:
    with pytest.raises(ValidationError) as err:
        rate_percentage(PercentagePrice(rate=D(1)), [D(1), D(-2)])
    assert [d["field"] for d in err.value.details] == ["event_amounts.1"]


@given(spec=percentage_prices(per_event_bounds=False), events=amounts)
def test_total_form_equals_per_event_form(spec: PercentagePrice, events: list[D]) -> None:
    per_event = rate_percentage(spec, events).amount
    total = rate_percentage_total(spec, sum(events, D(0)), len(events)).amount
    assert per_event == total


@given(spec=percentage_prices(), events=amounts)
def test_per_event_fee_is_within_bounds(spec: PercentagePrice, events: list[D]) -> None:
    amount = rate_percentage(spec, events).amount
    n = len(events)
    if spec.min_per_event is not None:
        assert amount >= n * spec.min_per_event
    if spec.max_per_event is not None:
        assert amount <= n * spec.max_per_event
