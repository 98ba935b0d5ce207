"""Rate any price spec: dispatch to its model, then apply the per-period commitments.

Order: ``free_units`` (inside each model) → model → ``minimum`` floor → ``maximum`` cap. The
result is exact; rounding happens once, per line item (rating.lines).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from rating.base import Rating, check_quantity
from rating.flat import rate_flat
from rating.graduated import rate_graduated
from rating.money import exact
from rating.package import rate_package
from rating.per_unit import rate_per_unit
from rating.percentage import rate_percentage, rate_percentage_total
from rating.staircase import rate_staircase
from rating.volume import rate_volume
from schemas.pricing import (
    BreakdownPart,
    FlatPrice,
    GraduatedPrice,
    PackagePrice,
    PercentagePrice,
    PerUnitPrice,
    PriceSpec,
    StaircasePrice,
    VolumePrice,
)
from tally.errors import ValidationError

_MODELS: dict[type[Any], Callable[[Any, Decimal], Rating]] = {
    FlatPrice: rate_flat,
    PerUnitPrice: rate_per_unit,
    GraduatedPrice: rate_graduated,
    VolumePrice: rate_volume,
    PackagePrice: rate_package,
    StaircasePrice: rate_staircase,
}


def rate_model(
    price: PriceSpec,
    quantity: Decimal,
    *,
    event_amounts: Sequence[Decimal] | None = None,
    event_count: int | None = None,
) -> Rating:
    """The price model alone (with its free units), without minimum/maximum.

    ``event_amounts`` / ``event_count`` are used by ``percentage`` only (see rating.percentage);
    with ``event_amounts`` their sum must equal ``quantity``.
    """
    q = check_quantity(quantity)
    if isinstance(price, PercentagePrice):
        if event_amounts is None:
            return rate_percentage_total(price, q, event_count)
        with exact():
            events_total = sum(
                (check_quantity(a, "event_amounts") for a in event_amounts), Decimal(0)
            )
        if events_total != q:
            raise ValidationError(
                f"quantity {q} is not the sum of event_amounts ({events_total})",
                field="quantity",
            )
        if event_count is not None and event_count != len(event_amounts):
            raise ValidationError(
                "event_count does not match the number of event_amounts",
                field="event_count",
            )
        return rate_percentage(price, event_amounts)
    fn = _MODELS.get(type(price))
    if fn is None:
        raise ValidationError(f"unknown price model {type(price).__name__}", field="model")
    return fn(price, q)


def apply_commitments(price: PriceSpec, rating: Rating) -> Rating:
    """Raise the amount to ``minimum`` and cap it at ``maximum`` (adjustment parts listed)."""
    amount = rating.amount
    parts = list(rating.parts)
    with exact():
        if price.minimum is not None and amount < price.minimum:
            parts.append(BreakdownPart(label="minimum commitment", amount=price.minimum - amount))
            amount = price.minimum
        if price.maximum is not None and amount > price.maximum:
            parts.append(BreakdownPart(label="maximum cap", amount=price.maximum - amount))
            amount = price.maximum
    return Rating(amount=amount, parts=tuple(parts))


def rate(
    price: PriceSpec,
    quantity: Decimal,
    *,
    event_amounts: Sequence[Decimal] | None = None,
    event_count: int | None = None,
) -> Rating:
    """Exact amount of ``price`` at ``quantity`` with every wrapper applied (no rounding)."""
    base = rate_model(price, quantity, event_amounts=event_amounts, event_count=event_count)
    return apply_commitments(price, base)
