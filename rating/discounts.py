"""Discounts (pure): percentage or fixed, on one charge or on the whole invoice.

Order: per-charge discounts first (by id), then per-invoice discounts (by id), each on what is
left after the previous ones. A discount never turns its base negative: a fixed discount is
capped at its base and nothing is discounted from a base that is zero or negative. Each
discount is one ``discount`` line (negative), rounded once, half-up, to the currency exponent.

Base of a per-charge discount: the lines of that charge (fixed, usage, proration, minimum
true-up). Base of a per-invoice discount: every line except late-usage adjustments of earlier
periods (they were discounted, or not, on their own period's terms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from rating.lines import make_line
from rating.money import round_amount
from schemas.pricing import BreakdownPart, LineItem, LineKind

_CHARGE_KINDS = {LineKind.FIXED, LineKind.USAGE, LineKind.PRORATION, LineKind.MINIMUM_ADJUSTMENT}


@dataclass(frozen=True)
class DiscountSpec:
    id: str
    percentage: Decimal | None = None  # 0 < p <= 100
    amount: Decimal | None = None  # fixed, > 0, in the invoice currency
    charge_key: str | None = None  # None = the whole invoice
    description: str = ""


def _one(spec: DiscountSpec, base: Decimal, currency: str) -> LineItem | None:
    if base <= 0:
        return None
    if spec.percentage is not None:
        exact: Decimal | Fraction = Fraction(base) * Fraction(spec.percentage) / 100
        rounded = round_amount(exact, currency)
        note = f"{spec.percentage}% of {base}"
    else:
        assert spec.amount is not None
        exact = min(spec.amount, base)
        rounded = round_amount(exact, currency)
        note = f"{spec.amount} off" + (f" (capped at {base})" if spec.amount > base else "")
    if rounded == 0:
        return None
    what = f"charge {spec.charge_key}" if spec.charge_key else "invoice"
    label = spec.description or (
        f"Discount {spec.percentage}% on {what}"
        if spec.percentage is not None
        else f"Discount {spec.amount} on {what}"
    )
    return make_line(
        LineKind.DISCOUNT,
        -rounded,
        currency,
        quantity=Decimal(1),
        breakdown=[BreakdownPart(label=note, amount=-rounded)],
        description=label,
        charge_key=spec.charge_key,
    )


def discount_lines(
    lines: Sequence[LineItem], discounts: Sequence[DiscountSpec], currency: str
) -> list[LineItem]:
    """The discount lines for ``lines`` (amounts negative)."""
    out: list[LineItem] = []
    per_charge = sorted((d for d in discounts if d.charge_key), key=lambda d: d.id)
    per_invoice = sorted((d for d in discounts if not d.charge_key), key=lambda d: d.id)
    for spec in per_charge:
        base = sum(
            (
                ln.amount
                for ln in lines
                if ln.charge_key == spec.charge_key and ln.kind in _CHARGE_KINDS
            ),
            Decimal(0),
        )
        base += sum((d.amount for d in out if d.charge_key == spec.charge_key), Decimal(0))
        line = _one(spec, base, currency)
        if line is not None:
            out.append(line)
    for spec in per_invoice:
        base = sum((ln.amount for ln in lines if ln.kind is not LineKind.ADJUSTMENT), Decimal(0))
        base += sum((d.amount for d in out), Decimal(0))
        line = _one(spec, base, currency)
        if line is not None:
            out.append(line)
    return out
