"""``per_unit``: quantity times unit_amount, optionally packaged first.

With ``package {divide_by, round}`` the (free-unit reduced) quantity is divided by ``divide_by``
and rounded up/down to an integer before it is multiplied by ``unit_amount``.
"""

from __future__ import annotations

from decimal import Decimal

from rating.base import Rating, chargeable, total, whole_units
from rating.money import exact
from schemas.pricing import BreakdownPart, PerUnitPrice


def rate_per_unit(spec: PerUnitPrice, quantity: Decimal) -> Rating:
    with exact():
        q, parts = chargeable(quantity, spec.free_units)
        if spec.package is not None:
            units = whole_units(q, spec.package.divide_by, spec.package.round)
            label = f"{units} x {spec.package.divide_by} units ({spec.package.round.value})"
        else:
            units = q
            label = "units"
        parts.append(
            BreakdownPart(
                label=label,
                quantity=units,
                unit_amount=spec.unit_amount,
                amount=units * spec.unit_amount,
            )
        )
        return Rating(amount=total(parts), parts=tuple(parts))
