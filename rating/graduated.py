"""``graduated``: each tier's slice of the quantity at that tier's rate, plus the flat fee of
every tier reached.

Tier ``i`` covers ``(up_to[i-1], up_to[i]]`` (the first starts at 0). A tier is reached when the
quantity exceeds its lower bound; the first tier is always reached, so quantity 0 costs the first
tier's flat fee.
"""

from __future__ import annotations

from decimal import Decimal

from rating.base import ZERO, Rating, chargeable, total
from rating.money import exact
from schemas.pricing import BreakdownPart, GraduatedPrice


def rate_graduated(spec: GraduatedPrice, quantity: Decimal) -> Rating:
    with exact():
        q, parts = chargeable(quantity, spec.free_units)
        lower = ZERO
        for i, tier in enumerate(spec.tiers):
            if i > 0 and q <= lower:
                break
            upper = q if tier.up_to is None else min(q, tier.up_to)
            units = max(upper - lower, ZERO)
            bound = "inf" if tier.up_to is None else str(tier.up_to)
            parts.append(
                BreakdownPart(
                    label=f"tier {i + 1} ({lower}, {bound}] units",
                    quantity=units,
                    unit_amount=tier.unit_amount,
                    amount=units * tier.unit_amount,
                )
            )
            if tier.flat_amount:
                parts.append(BreakdownPart(label=f"tier {i + 1} flat fee", amount=tier.flat_amount))
            if tier.up_to is None:
                break
            lower = tier.up_to
        return Rating(amount=total(parts), parts=tuple(parts))
