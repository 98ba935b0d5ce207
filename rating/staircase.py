"""``staircase``: one fixed amount for the band (step) the quantity falls in.

Step ``i`` covers ``(up_to[i-1], up_to[i]]``; quantity 0 falls in the first step.
"""

from __future__ import annotations

from decimal import Decimal

from rating.base import Rating, chargeable, total
from rating.money import exact
from rating.tiers import band_index
from schemas.pricing import BreakdownPart, StaircasePrice


def rate_staircase(spec: StaircasePrice, quantity: Decimal) -> Rating:
    with exact():
        q, parts = chargeable(quantity, spec.free_units)
        i = band_index(spec.steps, q)
        step = spec.steps[i]
        bound = "inf" if step.up_to is None else str(step.up_to)
        parts.append(
            BreakdownPart(label=f"step {i + 1} (up to {bound})", quantity=q, amount=step.amount)
        )
        return Rating(amount=total(parts), parts=tuple(parts))
