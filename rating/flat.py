"""``flat``: a fixed fee per period. The quantity is ignored (only checked)."""

from __future__ import annotations

from decimal import Decimal

from rating.base import Rating, check_quantity
from rating.money import exact
from schemas.pricing import BreakdownPart, FlatPrice


def rate_flat(spec: FlatPrice, quantity: Decimal = Decimal(1)) -> Rating:
    check_quantity(quantity)
    with exact():
        part = BreakdownPart(label="flat fee", amount=spec.amount)
        return Rating(amount=spec.amount, parts=(part,))
