"""Time-weighted value of a gauge (seat) meter whose events carry deltas.

``value = sum over the period of running_total * seconds / seconds in the period`` — the
time-weighted average of the running total, exact (a Fraction). Deltas before the period start
set the opening total; deltas at or after the period end are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from rating.money import round_half_up
from rating.periods import Period
from tally.errors import ValidationError


def _us(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def time_weighted_sum(
    deltas: Iterable[tuple[datetime, Decimal | int]],
    period: Period,
    opening: Decimal | int = 0,
) -> Fraction:
    """Exact time-weighted average of the running total of ``deltas`` over ``period``."""
    events = sorted(deltas, key=lambda e: e[0])
    running = Fraction(opening)
    weighted = Fraction(0)
    cursor = period.start
    for i, (at, delta) in enumerate(events):
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValidationError("event time must be timezone-aware", field=f"deltas.{i}")
        if isinstance(delta, bool | float) or not isinstance(delta, Decimal | int):
            raise ValidationError("delta must be a Decimal or int", field=f"deltas.{i}")
        if at >= period.end:
            break
        if at > cursor:
            weighted += running * _us(at - cursor)
            cursor = at
        running += Fraction(delta)
    weighted += running * _us(period.end - cursor)
    return weighted / _us(period.duration)


def latest_value(
    deltas: Iterable[tuple[datetime, Decimal | int]], at: datetime, opening: Decimal | int = 0
) -> Decimal:
    """Running total just after every delta with time ``<= at`` (a ``latest`` seat count)."""
    total = Decimal(opening)
    for when, delta in deltas:
        if when <= at:
            total += Decimal(delta)
    return total


def to_quantity(value: Fraction, places: int = 9) -> Decimal:
    """A Fraction as a Decimal quantity, half-up to ``places`` (9 = the usage store's scale)."""
    return round_half_up(value, places)
