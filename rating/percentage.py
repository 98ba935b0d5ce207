"""``percentage``: a percentage of a transaction-amount meter, with per-event fixed fee and
per-event minimum/maximum.

Two inputs:

- ``rate_percentage(spec, amounts)`` — exact per event. ``free_units`` (a free transaction
  amount) is consumed by the events in the given (chronological) order. Each event's fee is
  ``chargeable_amount * rate / 100 + fixed_amount``, then clamped to
  ``[min_per_event, max_per_event]``. Every event pays the fixed fee, including one whose amount
  is entirely free.
- ``rate_percentage_total(spec, total, event_count)`` — when only the meter's sum (and count) is
  known: ``max(total - free_units, 0) * rate / 100 + fixed_amount * event_count``. Exactly equal to
  the per-event form when no per-event minimum/maximum is set; with one set it refuses
  (tally ValidationError on ``event_amounts``) rather than guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from rating.base import ZERO, Rating, check_quantity, total
from rating.money import exact
from schemas.pricing import BreakdownPart, PercentagePrice
from tally.errors import ValidationError


def _fraction(spec: PercentagePrice) -> Decimal:
    return spec.rate.scaleb(-2)


def rate_percentage(spec: PercentagePrice, amounts: Sequence[Decimal]) -> Rating:
    """Per-event exact form; ``amounts`` are the events' transaction amounts, in order."""
    with exact():
        free_left = spec.free_units
        gross = ZERO
        fees = ZERO
        free_used = ZERO
        clamped = ZERO  # sum of per-event min/max adjustments
        for i, raw in enumerate(amounts):
            a = check_quantity(raw, f"event_amounts.{i}")
            gross += a
            free = min(a, free_left)
            free_left -= free
            free_used += free
            fee = (a - free) * _fraction(spec) + spec.fixed_amount
            bounded = fee
            if spec.min_per_event is not None:
                bounded = max(bounded, spec.min_per_event)
            if spec.max_per_event is not None:
                bounded = min(bounded, spec.max_per_event)
            clamped += bounded - fee
            fees += bounded
        n = len(amounts)
        parts = []
        if free_used:
            parts.append(
                BreakdownPart(
                    label="free transaction amount",
                    quantity=free_used,
                    unit_amount=ZERO,
                    amount=ZERO,
                )
            )
        parts.append(
            BreakdownPart(
                label=f"{spec.rate}% of transaction amount",
                quantity=gross - free_used,
                unit_amount=_fraction(spec),
                amount=(gross - free_used) * _fraction(spec),
            )
        )
        if spec.fixed_amount:
            parts.append(
                BreakdownPart(
                    label="fixed fee per event",
                    quantity=Decimal(n),
                    unit_amount=spec.fixed_amount,
                    amount=n * spec.fixed_amount,
                )
            )
        if clamped:
            parts.append(BreakdownPart(label="per-event minimum/maximum", amount=clamped))
        result = total(parts)
        assert result == fees  # the parts are an exact decomposition of the per-event fees
        return Rating(amount=result, parts=tuple(parts))


def rate_percentage_total(
    spec: PercentagePrice, total_amount: Decimal, event_count: int | None = None
) -> Rating:
    """Total-only form: rate on the (free-reduced) total, plus the fixed fee times the count."""
    if spec.min_per_event is not None or spec.max_per_event is not None:
        raise ValidationError(
            "a percentage price with min_per_event/max_per_event needs the individual event "
            "amounts",
            field="event_amounts",
        )
    if spec.fixed_amount and event_count is None:
        raise ValidationError(
            "a percentage price with fixed_amount needs event_count",
            field="event_count",
        )
    if event_count is not None and (isinstance(event_count, bool) or event_count < 0):
        raise ValidationError("event_count must be >= 0", field="event_count")
    with exact():
        gross = check_quantity(total_amount)
        free = min(gross, spec.free_units)
        parts = []
        if free:
            parts.append(
                BreakdownPart(
                    label="free transaction amount", quantity=free, unit_amount=ZERO, amount=ZERO
                )
            )
        parts.append(
            BreakdownPart(
                label=f"{spec.rate}% of transaction amount",
                quantity=gross - free,
                unit_amount=_fraction(spec),
                amount=(gross - free) * _fraction(spec),
            )
        )
        if spec.fixed_amount:
            n = event_count or 0
            parts.append(
                BreakdownPart(
                    label="fixed fee per event",
                    quantity=Decimal(n),
                    unit_amount=spec.fixed_amount,
                    amount=n * spec.fixed_amount,
                )
            )
        return Rating(amount=total(parts), parts=tuple(parts))
