"""The result of rating a price model, and helpers shared by the model modules."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from schemas.pricing import BreakdownPart, RoundMode
from tally.errors import ValidationError

ZERO = Decimal(0)


@dataclass(frozen=True)
class Rating:
    """An exact (unrounded) amount and the parts it is the sum of."""

    amount: Decimal
    parts: tuple[BreakdownPart, ...] = ()


def check_quantity(quantity: Any, field: str = "quantity") -> Decimal:
    """Quantities are non-negative finite Decimals (ints accepted); anything else is refused."""
    if isinstance(quantity, bool) or not isinstance(quantity, Decimal | int):
        raise ValidationError(
            f"{field} must be a Decimal, got {type(quantity).__name__}", field=field
        )
    q = Decimal(quantity)
    if not q.is_finite():
        raise ValidationError(f"{field} must be finite", field=field)
    if q < 0:
        raise ValidationError(f"{field} must be >= 0, got {q}", field=field)
    return q


def chargeable(quantity: Decimal, free_units: Decimal) -> tuple[Decimal, list[BreakdownPart]]:
    """Subtract the free units (floored at 0); the free part is listed with amount 0."""
    q = check_quantity(quantity)
    if free_units <= 0:
        return q, []
    free = min(q, free_units)
    part = BreakdownPart(label="free units", quantity=free, unit_amount=ZERO, amount=ZERO)
    return q - free, [part]


def whole_units(quantity: Decimal, divisor: Decimal, mode: RoundMode) -> Decimal:
    """``quantity / divisor`` rounded up or down to an integer, computed exactly."""
    whole, rest = divmod(quantity, divisor)
    if rest and mode is RoundMode.UP:
        whole += 1
    return whole


def total(parts: list[BreakdownPart]) -> Decimal:
    return sum((p.amount for p in parts), ZERO)
