from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from fractions import Fraction as F

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rating.lines import rate_charge
from rating.money import round_amount
from rating.periods import Period
from rating.proration import (
    prorate,
    prorate_between,
    prorated_charge,
    proration_factor,
    upgrade_proration,
)
from schemas.pricing import FlatPrice, LineKind, PerUnitPrice, PlanCharge
from tally.errors import ValidationError
from tests.unit.rating.strategies import flat_prices, money, per_unit_prices

JUNE = Period(datetime(2024, 6, 1, tzinfo=UTC), datetime(2024, 7, 1, tzinfo=UTC))  # 30 days


def test_prorate_by_the_second() -> None:
    assert prorate(D(30), JUNE, datetime(2024, 6, 16, tzinfo=UTC), JUNE.end) == F(15)
    one_second = datetime(2024, 6, 1, 0, 0, 1, tzinfo=UTC)
    assert proration_factor(JUNE, JUNE.start, one_second) == F(1, 30 * 86400)
    # clipped to the period; outside -> 0
    assert prorate(D(30), JUNE, datetime(2024, 5, 1, tzinfo=UTC), JUNE.end) == F(30)
    assert prorate(D(30), JUNE, JUNE.end, JUNE.end + timedelta(days=3)) == 0
    assert prorate_between(D(30), JUNE.start, JUNE.end, JUNE.start, JUNE.end) == F(30)


def test_inverted_range_is_refused() -> None:
    with pytest.raises(ValidationError) as err:
        proration_factor(JUNE, JUNE.end, JUNE.start)
    assert [d["field"] for d in err.value.details] == ["used_to"]


def test_prorated_seat_line() -> None:
    seats = PerUnitPrice(unit_amount=D(10))
    line = prorated_charge(seats, D(3), "USD", JUNE, datetime(2024, 6, 21, tzinfo=UTC), JUNE.end)
    assert line.kind is LineKind.PRORATION
    assert line.amount == D("10.00")  # 30 * 10/30
    third = datetime(2024, 6, 11, 8, tzinfo=UTC)  # 19 2/3 days left of 30
    line = prorated_charge(seats, D(1), "USD", JUNE, third, JUNE.end)
    assert line.exact_amount == "59/9" and line.amount == D("6.56")


def test_upgrade_mid_period() -> None:
    old = [
        PlanCharge(key="base", price=FlatPrice(amount=D(30))),
        PlanCharge(key="api", meter_slug="calls", price=PerUnitPrice(unit_amount=D(1))),
    ]
    new = [
        PlanCharge(key="base", price=FlatPrice(amount=D(90))),
        PlanCharge(key="seats", price=PerUnitPrice(unit_amount=D(6))),
    ]
    at = datetime(2024, 6, 21, tzinfo=UTC)  # 10 of 30 days left
    lines = upgrade_proration(old, new, JUNE, at, "USD", new_quantities={"seats": D(5)})
    assert [(ln.charge_key, ln.amount) for ln in lines] == [
        ("base", D("-10.00")),
        ("base", D("30.00")),
        ("seats", D("10.00")),
    ]
    assert all(ln.kind is LineKind.PRORATION for ln in lines)
    assert lines[0].period_start == at and lines[0].period_end == JUNE.end
    with pytest.raises(ValidationError):
        upgrade_proration(old, new, JUNE, JUNE.end, "USD")


periods = st.builds(
    lambda start, secs: Period(start, start + timedelta(seconds=secs)),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1)).map(
        lambda d: d.replace(tzinfo=UTC, microsecond=0)
    ),
    st.integers(min_value=1, max_value=366 * 86400),
)


@given(price=st.one_of(flat_prices(), per_unit_prices()), q=st.integers(0, 1000), p=periods)
def test_whole_period_proration_is_the_full_price(price: object, q: int, p: Period) -> None:
    full = rate_charge(price, D(q), "USD")  # type: ignore[arg-type]
    line = prorated_charge(price, D(q), "USD", p, p.start, p.end)  # type: ignore[arg-type]
    assert line.amount == full.amount


@given(
    amount=money, p=periods, cut=st.floats(0, 1), currency=st.sampled_from(["USD", "JPY", "KWD"])
)
def test_split_period_sums_to_whole(amount: D, p: Period, cut: float, currency: str) -> None:
    at = p.start + (p.end - p.start) * cut
    at = min(max(at, p.start), p.end)
    first = prorate(amount, p, p.start, at)
    second = prorate(amount, p, at, p.end)
    assert first + second == amount  # exact
    unit = D(1).scaleb(-{"USD": 2, "JPY": 0, "KWD": 3}[currency])
    rounded = round_amount(first, currency) + round_amount(second, currency)
    assert abs(rounded - round_amount(amount, currency)) <= unit
