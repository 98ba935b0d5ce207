"""``package``: ``amount`` per package of ``package_size`` units, after ``free_units``.

Packages are counted by rounding ``quantity / package_size`` up (every started package is paid)
or down (only completed packages are paid).
"""

from __future__ import annotations

from decimal import Decimal

from rating.base import Rating, chargeable, total, whole_units
from rating.money import exact
from schemas.pricing import BreakdownPart, PackagePrice


def rate_package(spec: PackagePrice, quantity: Decimal) -> Rating:
    with exact():
        q, parts = chargeable(quantity, spec.free_units)
        packages = whole_units(q, spec.package_size, spec.round)
        parts.append(
            BreakdownPart(
                label=f"packages of {spec.package_size} ({spec.round.value}, {q} units)",
                quantity=packages,
                unit_amount=spec.amount,
                amount=packages * spec.amount,
            )
        )
        return Rating(amount=total(parts), parts=tuple(parts))
