"""``volume``: every unit at the rate of the tier the total falls in, plus that tier's flat fee.

Quantity 0 falls in the first tier, so it costs that tier's flat fee. Note that volume pricing is
not monotonic in general: crossing into a cheaper tier can lower the amount.
"""

from __future__ import annotations

from decimal import Decimal

from rating.base import Rating, chargeable, total
from rating.money import exact
from rating.tiers import band_index
from schemas.pricing import BreakdownPart, VolumePrice


def rate_volume(spec: VolumePrice, quantity: Decimal) -> Rating:
    with exact():
        q, parts = chargeable(quantity, spec.free_units)
        i = band_index(spec.tiers, q)
        tier = spec.tiers[i]
        parts.append(
            BreakdownPart(
                label=f"tier {i + 1} units",
                quantity=q,
                unit_amount=tier.unit_amount,
                amount=q * tier.unit_amount,
            )
        )
        if tier.flat_amount:
            parts.append(BreakdownPart(label=f"tier {i + 1} flat fee", amount=tier.flat_amount))
        return Rating(amount=total(parts), parts=tuple(parts))
