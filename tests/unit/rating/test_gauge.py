from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from fractions import Fraction as F

from hypothesis import given, settings
from hypothesis import strategies as st

from rating.gauge import latest_value, time_weighted_sum, to_quantity
from rating.periods import Period

P = Period(datetime(2024, 6, 1, tzinfo=UTC), datetime(2024, 6, 2, tzinfo=UTC))


def at(hours: float) -> datetime:
    return P.start + timedelta(hours=hours)


def test_opening_and_out_of_period_deltas() -> None:
    deltas = [(at(-5), D(4)), (at(12), D(-2)), (at(30), D(100))]
    # 4 seats for 12 h, 2 seats for 12 h
    assert time_weighted_sum(deltas, P) == F(3)
    assert time_weighted_sum(deltas, P, opening=1) == F(4)
    assert latest_value(deltas, at(13)) == D(2)
    assert to_quantity(F(2, 3)) == D("0.666666667")


@given(
    level=st.integers(0, 1000),
    times=st.lists(st.floats(0, 23.99), max_size=10),
)
def test_zero_deltas_keep_a_constant_level(level: int, times: list[float]) -> None:
    deltas = [(at(h), D(0)) for h in times]
    assert time_weighted_sum(deltas, P, opening=level) == level


HOUR = Period(P.start, P.start + timedelta(hours=1))


@settings(deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3599), st.integers(-5, 5)), max_size=20))
def test_matches_second_by_second_sum(events: list[tuple[int, int]]) -> None:
    deltas = [(HOUR.start + timedelta(seconds=s), D(v)) for s, v in events]
    per_second = [0] * 3600
    for s, v in events:
        for t in range(s, 3600):
            per_second[t] += v
    assert time_weighted_sum(deltas, HOUR) == F(sum(per_second), 3600)
