"""Second-level (in fact millisecond-exact) proration and mid-period plan changes.

``factor = overlap([used_from, used_to), period) / duration(period)``, computed exactly on
integer microseconds, so prorating over the whole period returns the full amount and prorated
parts of a split period add up exactly (before each line's own rounding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from rating.engine import rate
from rating.lines import make_line, resolve_currency
from rating.money import exact_str
from rating.periods import Period
from schemas.pricing import BreakdownPart, LineItem, LineKind, PlanCharge, PriceSpec
from tally.errors import ValidationError


def _us(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def proration_factor(period: Period, used_from: datetime, used_to: datetime) -> Fraction:
    """Share of ``period`` covered by ``[used_from, used_to)`` (clipped to the period)."""
    for name, value in (("used_from", used_from), ("used_to", used_to)):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValidationError(f"{name} must be timezone-aware", field=name)
    if used_to < used_from:
        raise ValidationError("used_to must not be before used_from", field="used_to")
    lo = max(used_from, period.start)
    hi = min(used_to, period.end)
    if hi <= lo:
        return Fraction(0)
    return Fraction(_us(hi - lo), _us(period.duration))


def prorate(amount: Decimal, period: Period, used_from: datetime, used_to: datetime) -> Fraction:
    """Exact prorated ``amount`` (a Fraction: round it with rating.money.round_amount)."""
    return Fraction(amount) * proration_factor(period, used_from, used_to)


def prorate_between(
    amount: Decimal,
    period_start: datetime,
    period_end: datetime,
    active_start: datetime,
    active_end: datetime,
) -> Fraction:
    """``prorate`` with the period given as two datetimes (per-seat prices)."""
    return prorate(amount, Period(period_start, period_end), active_start, active_end)


def prorated_charge(
    price: PriceSpec,
    quantity: Decimal,
    currency: str | None,
    period: Period,
    used_from: datetime,
    used_to: datetime,
    *,
    credit: bool = False,
    description: str = "",
    charge_key: str | None = None,
    meter_slug: str | None = None,
) -> LineItem:
    """A ``proration`` line: the full-period amount of ``price`` at ``quantity`` times the
    covered share, rounded once. ``credit=True`` makes it negative (refund of an unused part)."""
    code = resolve_currency(price, currency)
    full = rate(price, quantity)
    factor = proration_factor(period, used_from, used_to)
    value = Fraction(full.amount) * factor * (-1 if credit else 1)
    lo, hi = max(used_from, period.start), min(used_to, period.end)
    note = f"full-period amount {full.amount} x {exact_str(factor)}" + (
        " (credit)" if credit else ""
    )
    # The full-period parts, then a zero-amount note: the exact prorated value (possibly not a
    # finite decimal) is the line's exact_amount.
    parts = [*full.parts, BreakdownPart(label=note, amount=Decimal(0))]
    return make_line(
        LineKind.PRORATION,
        value,
        code,
        quantity=Decimal(quantity),
        price=price,
        breakdown=parts,
        description=description,
        charge_key=charge_key,
        meter_slug=meter_slug,
        period_start=lo if hi > lo else period.start,
        period_end=hi if hi > lo else period.start,
    )


def upgrade_proration(
    old_charges: Sequence[PlanCharge],
    new_charges: Sequence[PlanCharge],
    period: Period,
    at: datetime,
    currency: str,
    *,
    old_quantities: Mapping[str, Decimal] | None = None,
    new_quantities: Mapping[str, Decimal] | None = None,
) -> list[LineItem]:
    """A plan change at ``at`` inside ``period`` (fixed fees are billed in advance): one credit
    line (negative) per old fixed charge for ``[at, period.end)`` and one charge line per new
    fixed charge for the same span. Usage charges (with a meter) are skipped: they are rated in
    arrears on their own. Quantities default to 1 per charge key."""
    if not period.contains(at):
        raise ValidationError("the change time must fall inside the period", field="at")
    lines: list[LineItem] = []
    for charges, quantities, credit in (
        (old_charges, old_quantities or {}, True),
        (new_charges, new_quantities or {}, False),
    ):
        for charge in charges:
            if charge.meter_slug is not None:
                continue
            what = "unused" if credit else "remaining"
            lines.append(
                prorated_charge(
                    charge.price,
                    quantities.get(charge.key, Decimal(1)),
                    currency,
                    period,
                    at,
                    period.end,
                    credit=credit,
                    description=f"{charge.description or charge.key} ({what} part of period)",
                    charge_key=charge.key,
                )
            )
    return lines
