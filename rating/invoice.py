"""Upcoming-invoice assembly (pure: usage numbers are passed in).

Two steps, so that the I/O stays outside:

1. ``usage_keys(sub, plans, period)`` lists the usage numbers the invoice needs: one
   ``UsageKey(meter, group_by, start, end)`` per metered charge and plan segment.
2. The caller fetches them (ClickHouse pre-aggregates) and ``assemble_upcoming_invoice`` builds
   the lines and totals.

Rules (docs/catalog.md):

- Fixed fees (charges without a meter, quantity 1) are billed **in advance**: the period's
  invoice carries the full fee of the plan in force at the period start if the subscription is
  ``active`` then. Every later change inside the period (plan change, pause, resume, cancel,
  trial end, a start inside the period) at time ``t`` adds proration lines: a credit of the
  old fixed fees for ``[t, end)`` (if they were being billed) and a charge of the new ones for
  ``[t, end)`` (if they are billed now), exact to the millisecond and rounded once per line.
  Only ``active`` time is billed for fixed fees (not trialing, paused or canceled time).
- Usage is billed **in arrears** for the time the subscription is live (trialing, active or
  paused; started and not canceled), split into segments at plan changes: each segment is rated
  with its own plan version's charges on its own usage. Boundaries are floored to the minute
  (the pre-aggregates are per minute): the minute containing a boundary belongs to what follows.
- A charge with ``group_by`` is rated separately for every value of that dimension (one line
  per group); a charge without it gives one line even when there was no usage (so a minimum
  commitment shows).
- Every line is rounded once (half-up, currency exponent); subtotal = sum of the lines; tax per
  rate and line rounded once; total = subtotal + tax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from fractions import Fraction

from rating.lines import invoice_totals, rate_charge, rate_charge_lines
from rating.money import round_amount
from rating.periods import Period
from rating.proration import prorated_charge, upgrade_proration
from rating.subscriptions import current_period, state_at
from schemas.catalog import (
    Customer,
    PlanVersion,
    Subscription,
    SubscriptionStatus,
    TaxAmount,
    Transition,
    UpcomingInvoice,
)
from schemas.pricing import LineItem, LineKind, PercentagePrice, PlanCharge, PlanSpec
from tally.errors import ValidationError

PlanKey = tuple[str, int]
PlanLookup = Mapping[PlanKey, PlanVersion]


@dataclass(frozen=True)
class UsageKey:
    """One usage number an invoice needs: ``meter_slug`` over ``[start, end)`` (whole minutes),
    per value of ``group_by`` when set."""

    meter_slug: str
    group_by: str | None
    start: datetime
    end: datetime


@dataclass(frozen=True)
class UsageAmount:
    """A metered quantity (for one group when the key has ``group_by``). ``events`` is the
    number of matched events (needed by a percentage price with a per-event fixed fee)."""

    quantity: Decimal
    group: Mapping[str, str] | None = None
    events: int | None = None


UsageData = Mapping[UsageKey, Sequence[UsageAmount]]


@dataclass(frozen=True)
class Segment:
    """A span of a period during which one plan version is in force and usage is billed."""

    start: datetime
    end: datetime
    plan: PlanKey
    statuses: tuple[SubscriptionStatus, ...] = field(default=())


def floor_minute(dt: datetime) -> datetime:
    return dt.replace(second=0, microsecond=0)


def _plan(plans: PlanLookup, key: PlanKey) -> PlanVersion:
    try:
        return plans[key]
    except KeyError:
        raise KeyError(f"plan {key[0]} v{key[1]} was not supplied") from None


def _changes_inside(sub: Subscription, period: Period) -> list[tuple[datetime, Transition]]:
    """Transitions strictly inside the period, grouped: the last state at each distinct time."""
    out: dict[datetime, Transition] = {}
    for tr in sub.history:
        if period.start < tr.at < period.end:
            out[tr.at] = tr
    return sorted(out.items())


def _live(tr: Transition | None) -> bool:
    return tr is not None and tr.status is not SubscriptionStatus.CANCELED


def _billable(tr: Transition | None) -> bool:
    return tr is not None and tr.status is SubscriptionStatus.ACTIVE


# ---------------------------------------------------------------------------------------------
# Segments and the usage an invoice needs
# ---------------------------------------------------------------------------------------------


def usage_segments(sub: Subscription, period: Period) -> list[Segment]:
    """The live spans of ``period`` per plan version, with minute-floored boundaries."""
    raw: list[tuple[datetime, datetime, PlanKey]] = []
    state = state_at(sub, period.start)
    cursor = period.start
    for at, tr in [*_changes_inside(sub, period), (period.end, None)]:
        if _live(state):
            assert state is not None
            key = (state.plan_code, state.plan_version)
            if raw and raw[-1][1] == cursor and raw[-1][2] == key:
                raw[-1] = (raw[-1][0], at, key)  # same plan (e.g. a pause): one segment
            else:
                raw.append((cursor, at, key))
        cursor = at
        state = tr
    segments = []
    for start, end, key in raw:
        a, b = floor_minute(start), floor_minute(end)
        if b > a:
            segments.append(Segment(a, b, key))
    return segments


def usage_keys(sub: Subscription, plans: PlanLookup, period: Period) -> list[UsageKey]:
    """Every usage number ``assemble_upcoming_invoice`` will read, without duplicates."""
    keys: list[UsageKey] = []
    for seg in usage_segments(sub, period):
        for charge in _plan(plans, seg.plan).usage_charges:
            assert charge.meter_slug is not None
            key = UsageKey(charge.meter_slug, charge.group_by, seg.start, seg.end)
            if key not in keys:
                keys.append(key)
    return keys


# ---------------------------------------------------------------------------------------------
# Lines
# ---------------------------------------------------------------------------------------------


def _label(charge: PlanCharge, plan: PlanSpec | PlanVersion) -> str:
    base = charge.description or charge.key
    version = getattr(plan, "version", None)
    return f"{base} ({plan.code} v{version})" if version is not None else f"{base} ({plan.code})"


def fixed_lines(sub: Subscription, plans: PlanLookup, period: Period) -> list[LineItem]:
    """Fixed fees in advance, then a credit/charge proration pair per change inside the period."""
    lines: list[LineItem] = []
    state = state_at(sub, period.start)
    if _billable(state):
        assert state is not None
        plan = _plan(plans, (state.plan_code, state.plan_version))
        for charge in plan.fixed_charges:
            lines.append(
                rate_charge(
                    charge.price,
                    Decimal(1),
                    sub.currency,
                    kind=LineKind.FIXED,
                    description=_label(charge, plan),
                    charge_key=charge.key,
                    period_start=period.start,
                    period_end=period.end,
                )
            )
    for at, tr in _changes_inside(sub, period):
        before, after = state, tr
        state = tr
        was, now = _billable(before), _billable(after)
        old = _plan(plans, (before.plan_code, before.plan_version)) if was and before else None
        new = _plan(plans, (after.plan_code, after.plan_version)) if now else None
        if old is not None and new is not None:
            if (old.code, old.version) == (new.code, new.version):
                continue
            pair = upgrade_proration(old.charges, new.charges, period, at, sub.currency)
            lines.extend(_relabel(pair, old, new))
        elif old is not None:
            lines.extend(_credit_or_charge(old, period, at, sub.currency, credit=True))
        elif new is not None:
            lines.extend(_credit_or_charge(new, period, at, sub.currency, credit=False))
    return lines


def _relabel(lines: list[LineItem], old: PlanVersion, new: PlanVersion) -> list[LineItem]:
    """Name the plan version on upgrade_proration's lines: one credit per old fixed charge,
    then one charge per new fixed charge, in that order."""
    n_old = len(old.fixed_charges)
    out = []
    for i, line in enumerate(lines):
        plan = old if i < n_old else new
        label = f"{line.description} ({plan.code} v{plan.version})"
        out.append(line.model_copy(update={"description": label}))
    return out


def _credit_or_charge(
    plan: PlanVersion, period: Period, at: datetime, currency: str, *, credit: bool
) -> list[LineItem]:
    what = "unused" if credit else "remaining"
    return [
        prorated_charge(
            charge.price,
            Decimal(1),
            currency,
            period,
            at,
            period.end,
            credit=credit,
            description=f"{charge.description or charge.key} ({what} part of period) "
            f"({plan.code} v{plan.version})",
            charge_key=charge.key,
        )
        for charge in plan.fixed_charges
    ]


def charge_usage_lines(
    charge: PlanCharge,
    amounts: Sequence[UsageAmount],
    currency: str,
    *,
    description: str,
    period_start: datetime | None = None,
    period_end: datetime | None = None,
) -> list[LineItem]:
    """Lines of one metered charge: one per group (sorted) with ``group_by``, else exactly one
    (quantities of several amounts are added)."""
    if charge.group_by is None:
        quantity = sum((a.quantity for a in amounts), Decimal(0))
        events: int | None = None
        if any(a.events is not None for a in amounts):
            events = sum(a.events or 0 for a in amounts)
        groups: list[tuple[Mapping[str, str] | None, Decimal, int | None]] = [
            (None, quantity, events)
        ]
    else:
        dim = charge.group_by
        groups = sorted(
            (({dim: (a.group or {}).get(dim, "")}, a.quantity, a.events) for a in amounts),
            key=lambda g: (g[0] or {}).get(dim, ""),
        )
    lines: list[LineItem] = []
    for group, quantity, events in groups:
        desc = description
        if quantity < 0:
            desc = f"{description} (negative usage {quantity} counted as 0)"
            quantity = Decimal(0)
        needs_count = isinstance(charge.price, PercentagePrice) and charge.price.fixed_amount
        lines.extend(
            rate_charge_lines(
                charge.price,
                quantity,
                currency,
                event_count=events if needs_count else None,
                kind=LineKind.USAGE,
                description=desc,
                charge_key=charge.key,
                meter_slug=charge.meter_slug,
                group=group,
                period_start=period_start,
                period_end=period_end,
            )
        )
    return lines


def usage_lines(
    sub: Subscription, plans: PlanLookup, period: Period, usage: UsageData
) -> list[LineItem]:
    lines: list[LineItem] = []
    for seg in usage_segments(sub, period):
        plan = _plan(plans, seg.plan)
        for charge in plan.usage_charges:
            assert charge.meter_slug is not None
            key = UsageKey(charge.meter_slug, charge.group_by, seg.start, seg.end)
            if key not in usage:
                raise KeyError(f"usage for {key} was not supplied")
            lines.extend(
                charge_usage_lines(
                    charge,
                    usage[key],
                    sub.currency,
                    description=_label(charge, plan),
                    period_start=seg.start,
                    period_end=seg.end,
                )
            )
    return lines


# ---------------------------------------------------------------------------------------------
# Totals and the invoice
# ---------------------------------------------------------------------------------------------


def tax_breakdown(
    lines: Sequence[LineItem], tax_rates: Mapping[str, Decimal], currency: str
) -> list[TaxAmount]:
    """Per tax rate: the sum over lines of ``round_half_up(line.amount * rate / 100)`` (the
    same rule as ``rating.invoice_totals``, shown per rate)."""
    out = []
    for name in sorted(tax_rates):
        rate = tax_rates[name]
        amount = sum(
            (
                round_amount(Fraction(line.amount) * Fraction(rate) / 100, currency)
                for line in lines
            ),
            round_amount(Fraction(0), currency),
        )
        out.append(TaxAmount(name=name, rate=rate, amount=amount))
    return out


def totals(
    lines: Sequence[LineItem], tax_rates: Mapping[str, Decimal], currency: str
) -> tuple[Decimal, list[TaxAmount], Decimal, Decimal]:
    """``(subtotal, taxes per rate, tax, total)``; raises if lines mix currencies."""
    for i, line in enumerate(lines):
        if line.currency != currency:
            raise ValidationError(
                f"line {i} is in {line.currency}, the invoice in {currency}",
                field="currency",
            )
    result = invoice_totals(lines, dict(tax_rates), currency)
    taxes = tax_breakdown(lines, tax_rates, currency)
    assert sum((t.amount for t in taxes), Decimal(0)) == result.tax
    return result.subtotal, taxes, result.tax, result.total


def assemble_upcoming_invoice(
    sub: Subscription,
    customer: Customer,
    plans: PlanLookup,
    usage: UsageData,
    now: datetime,
    period: Period | None = None,
) -> UpcomingInvoice:
    """The invoice of the period ``current_period(sub, now)`` (or ``period``) so far.

    ``sub`` should already be ``advance``-d to ``now``; ``plans`` must hold every plan version
    in its history; ``usage`` every key of ``usage_keys``.
    """
    if period is None:
        period = current_period(sub, now)
    lines = [*fixed_lines(sub, plans, period), *usage_lines(sub, plans, period, usage)]
    subtotal, taxes, tax, total = totals(lines, customer.tax_rates, sub.currency)
    return UpcomingInvoice(
        customer_id=sub.customer_id,
        subscription_id=sub.id,
        plan_code=sub.plan_code,
        plan_version=sub.plan_version,
        status=sub.status,
        currency=sub.currency,
        period_start=period.start,
        period_end=period.end,
        as_of=now,
        lines=lines,
        subtotal=subtotal,
        taxes=taxes,
        tax=tax,
        total=total,
    )


# ---------------------------------------------------------------------------------------------
# Preview (no subscription, no storage)
# ---------------------------------------------------------------------------------------------

PreviewUsage = Mapping[str, Decimal | Mapping[str, Decimal]]


def preview_plan_lines(plan: PlanSpec, usage: PreviewUsage) -> list[LineItem]:
    """One full period of ``plan``: every fixed fee, and every metered charge at the given
    quantities (``{meter: q}``, or ``{meter: {group value: q}}`` for a charge with group_by;
    a meter without an entry counts 0). A meter the plan does not use is an error."""
    used = {c.meter_slug for c in plan.charges if c.meter_slug is not None}
    for meter in usage:
        if meter not in used:
            raise ValidationError(
                f"usage.{meter}: no charge of plan {plan.code} uses meter {meter!r}",
                field=f"usage.{meter}",
            )
    lines: list[LineItem] = []
    for charge in plan.charges:
        label = _label(charge, plan)
        if charge.meter_slug is None:
            lines.append(
                rate_charge(
                    charge.price,
                    Decimal(1),
                    plan.currency,
                    kind=LineKind.FIXED,
                    description=label,
                    charge_key=charge.key,
                )
            )
            continue
        given = usage.get(charge.meter_slug, Decimal(0))
        amounts: list[UsageAmount]
        if isinstance(given, Mapping):
            if charge.group_by is None:
                raise ValidationError(
                    f"usage.{charge.meter_slug}: charge {charge.key} is not priced per group; "
                    "give this meter one quantity",
                    field=f"usage.{charge.meter_slug}",
                )
            amounts = [UsageAmount(q, {charge.group_by: g}) for g, q in given.items()]
        elif charge.group_by is not None:
            # One number for a per-group charge: a single group with an empty value.
            amounts = [UsageAmount(given, {charge.group_by: ""})] if given else []
        else:
            amounts = [UsageAmount(given)]
        lines.extend(charge_usage_lines(charge, amounts, plan.currency, description=label))
    return lines


__all__ = [
    "PlanLookup",
    "PreviewUsage",
    "Segment",
    "UsageAmount",
    "UsageData",
    "UsageKey",
    "assemble_upcoming_invoice",
    "charge_usage_lines",
    "fixed_lines",
    "floor_minute",
    "preview_plan_lines",
    "tax_breakdown",
    "totals",
    "usage_keys",
    "usage_lines",
    "usage_segments",
]
