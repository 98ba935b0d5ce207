"""Line items: rate a charge, round once (half-up, currency exponent), and total an invoice.

Rounding happens exactly once per line item. The invoice subtotal is the sum of the rounded
lines; tax is computed and rounded per line (and per tax rate), and the invoice tax is the sum of
those rounded per-line taxes, so every line can show its own tax and the totals always add up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from typing import NamedTuple

from rating.base import Rating
from rating.engine import apply_commitments, rate, rate_model
from rating.money import Exact, exact, exact_str, exponent, round_amount
from schemas.pricing import (
    CURRENCY_EXPONENTS,
    BreakdownPart,
    FlatPrice,
    LineItem,
    LineKind,
    PriceSpec,
)
from tally.errors import ValidationError

__all__ = [
    "InvoiceTotals",
    "LineItem",
    "LineKind",
    "invoice_totals",
    "line_from_rating",
    "make_line",
    "rate_charge",
    "rate_charge_lines",
    "resolve_currency",
]


def resolve_currency(price: PriceSpec | None, currency: str | None) -> str:
    """The currency to round in: the given one and/or the price's; they must agree."""
    own = price.currency if price is not None else None
    if currency is not None:
        code = currency.strip().upper()
        exponent(code)  # validates
        if own is not None and own != code:
            raise ValidationError(f"price currency {own} does not match {code}", field="currency")
        return code
    if own is None:
        raise ValidationError("no currency: pass one or set it on the price", field="currency")
    return own


def make_line(
    kind: LineKind,
    exact_amount: Exact,
    currency: str,
    *,
    quantity: Decimal = Decimal(0),
    price: PriceSpec | None = None,
    breakdown: Sequence[BreakdownPart] = (),
    description: str = "",
    charge_key: str | None = None,
    meter_slug: str | None = None,
    group: Mapping[str, str] | None = None,
    period_start: datetime | None = None,
    period_end: datetime | None = None,
) -> LineItem:
    """Build a line from an exact amount, applying the single half-up rounding."""
    code = resolve_currency(None, currency)
    return LineItem(
        kind=kind,
        description=description,
        charge_key=charge_key,
        meter_slug=meter_slug,
        group=dict(group) if group is not None else None,
        quantity=quantity,
        price=price,
        currency=code,
        amount=round_amount(exact_amount, code),
        exact_amount=exact_str(exact_amount),
        breakdown=list(breakdown),
        period_start=period_start,
        period_end=period_end,
    )


def line_from_rating(
    rating: Rating,
    price: PriceSpec,
    quantity: Decimal,
    currency: str,
    *,
    kind: LineKind | None = None,
    description: str = "",
    charge_key: str | None = None,
    meter_slug: str | None = None,
    group: Mapping[str, str] | None = None,
    period_start: datetime | None = None,
    period_end: datetime | None = None,
) -> LineItem:
    if kind is None:
        kind = LineKind.FIXED if isinstance(price, FlatPrice) else LineKind.USAGE
    return make_line(
        kind,
        rating.amount,
        currency,
        quantity=quantity,
        price=price,
        breakdown=rating.parts,
        description=description,
        charge_key=charge_key,
        meter_slug=meter_slug,
        group=group,
        period_start=period_start,
        period_end=period_end,
    )


def rate_charge(
    price: PriceSpec,
    quantity: Decimal,
    currency: str | None = None,
    *,
    event_amounts: Sequence[Decimal] | None = None,
    event_count: int | None = None,
    kind: LineKind | None = None,
    description: str = "",
    charge_key: str | None = None,
    meter_slug: str | None = None,
    group: Mapping[str, str] | None = None,
    period_start: datetime | None = None,
    period_end: datetime | None = None,
) -> LineItem:
    """Rate ``price`` at ``quantity`` (free units, model, minimum, maximum) as ONE line item,
    rounded once, half-up, to the currency's exponent.

    ``currency`` defaults to the price's own; if both are given they must match. ``kind``
    defaults to ``fixed`` for a flat price and ``usage`` otherwise.
    """
    code = resolve_currency(price, currency)
    rating = rate(price, quantity, event_amounts=event_amounts, event_count=event_count)
    return line_from_rating(
        rating,
        price,
        Decimal(quantity),
        code,
        kind=kind,
        description=description,
        charge_key=charge_key,
        meter_slug=meter_slug,
        group=group,
        period_start=period_start,
        period_end=period_end,
    )


def rate_charge_lines(
    price: PriceSpec,
    quantity: Decimal,
    currency: str | None = None,
    *,
    event_amounts: Sequence[Decimal] | None = None,
    event_count: int | None = None,
    kind: LineKind | None = None,
    description: str = "",
    charge_key: str | None = None,
    meter_slug: str | None = None,
    group: Mapping[str, str] | None = None,
    period_start: datetime | None = None,
    period_end: datetime | None = None,
) -> list[LineItem]:
    """Like rate_charge, but a minimum commitment top-up is its own ``minimum_adjustment`` line.

    The first line is the usage (capped by ``maximum``); the second, present only when the
    minimum raised the amount, is ``round(total) - round(usage)``, so the lines always sum to
    ``rate_charge(...).amount``.
    """
    code = resolve_currency(price, currency)
    base = rate_model(price, quantity, event_amounts=event_amounts, event_count=event_count)
    full = apply_commitments(price, base)
    usage_exact = base.amount
    if price.maximum is not None:
        usage_exact = min(usage_exact, price.maximum)
    usage_parts = [p for p in full.parts if p.label != "minimum commitment"]
    usage = line_from_rating(
        Rating(usage_exact, tuple(usage_parts)),
        price,
        Decimal(quantity),
        code,
        kind=kind,
        description=description,
        charge_key=charge_key,
        meter_slug=meter_slug,
        group=group,
        period_start=period_start,
        period_end=period_end,
    )
    if full.amount == usage_exact:
        return [usage]
    # The charge as a whole is rounded once: the top-up is round(total) - round(usage), so it
    # absorbs the usage line's rounding and the two lines add up to rate_charge's amount.
    top_up = round_amount(full.amount, code) - usage.amount
    adjustment = make_line(
        LineKind.MINIMUM_ADJUSTMENT,
        top_up,
        code,
        quantity=Decimal(0),
        price=price,
        breakdown=[BreakdownPart(label="minimum commitment", amount=top_up)],
        description=description,
        charge_key=charge_key,
        meter_slug=meter_slug,
        group=group,
        period_start=period_start,
        period_end=period_end,
    )
    return [usage, adjustment]


class InvoiceTotals(NamedTuple):
    subtotal: Decimal
    tax: Decimal
    total: Decimal


def invoice_totals(
    lines: Sequence[LineItem],
    tax_rates: Mapping[str, Decimal] | Sequence[Decimal] | None = None,
    currency: str | None = None,
) -> InvoiceTotals:
    """Subtotal = sum of the rounded lines; tax = sum over lines and rates of
    ``round_half_up(line.amount * rate / 100)``; total = subtotal + tax.

    ``tax_rates`` are percentages (``{"VAT": Decimal("20")}`` or ``[Decimal("20")]``). All lines
    must share one currency; ``currency`` is needed only when there are no lines.
    """
    codes = {line.currency for line in lines}
    if currency is not None:
        codes.add(resolve_currency(None, currency))
    if len(codes) != 1:
        raise ValidationError(
            "invoice lines must share exactly one currency"
            + (f" (got {sorted(codes)})" if codes else "; pass currency for an empty invoice"),
            field="currency",
        )
    code = codes.pop()
    places = CURRENCY_EXPONENTS[code]
    rates = list(tax_rates.values()) if isinstance(tax_rates, Mapping) else list(tax_rates or [])
    for r in rates:
        if not isinstance(r, Decimal) or not r.is_finite() or r < 0:
            raise ValidationError("tax rates must be Decimals >= 0", field="tax_rates")
    zero = Decimal(0).scaleb(-places)
    with exact():
        subtotal = sum((line.amount for line in lines), zero)
        tax = zero
        for line in lines:
            for r in rates:
                tax += round_amount(Fraction(line.amount) * Fraction(r) / 100, code)
        return InvoiceTotals(subtotal=subtotal, tax=tax, total=subtotal + tax)
