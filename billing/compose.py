"""Compose an invoice (pure, picklable inputs: runs in the invoice run's worker processes).

An invoice of period P of a subscription is: the fixed fees and prorations and the usage lines
of P (``rating.invoice``), then the late-usage adjustments of earlier finalized periods whose
re-rating went UP (a period whose re-rating went down gets a credit note instead, see
``billing.invoices``), then the discounts in force, then tax (exclusive or inclusive,
``rating.tax``). Every line is rounded once; the totals are sums of rounded amounts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal

from rating.adjustments import Billed, key_of, late_adjustments
from rating.discounts import DiscountSpec, discount_lines
from rating.invoice import PlanLookup, UsageData, fixed_lines, usage_keys, usage_lines
from rating.lines import make_line
from rating.periods import Period
from rating.tax import document_totals
from schemas.billing import (
    Contract,
    Discount,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    UsageSnapshot,
)
from schemas.catalog import Customer, Subscription, TaxAmount
from schemas.pricing import BreakdownPart, FlatPrice, LineItem, LineKind, PerUnitPrice


@dataclass(frozen=True)
class PriorPeriod:
    """A finalized earlier invoice of the same subscription, with its period's live usage and
    what was billed for it so far (per line key)."""

    invoice_id: str
    number: str | None
    period: Period
    usage: UsageData
    billed: Mapping[str, Billed]


@dataclass(frozen=True)
class ComposeInput:
    invoice_id: str
    revision: int
    sub: Subscription
    plans: PlanLookup
    period: Period
    usage: UsageData
    contract: Contract
    now: datetime
    created_at: datetime
    priors: Sequence[PriorPeriod] = ()
    run_id: str | None = None
    replaces: str | None = None
    # A replacement (after a void): the adjustments already billed for its period on other,
    # finalized invoices (``(document number, line)``): netted out, so the period is billed once.
    billed_elsewhere: Sequence[tuple[str | None, InvoiceLine]] = ()


@dataclass
class ComposeResult:
    invoice: Invoice
    # Earlier invoices whose re-rating went down: (invoice id, [(line key, adjustment line)]).
    credits: list[tuple[str, list[tuple[str, LineItem]]]] = field(default_factory=list)


def period_label(period: Period) -> str:
    return f"{period.start.date().isoformat()} to {period.end.date().isoformat()}"


def new_contract(
    tenant_name: str,
    customer: Customer,
    sub: Subscription,
    period: Period,
    discounts: Sequence[Discount],
) -> Contract:
    plans = sorted({f"{t.plan_code} v{t.plan_version}" for t in sub.history if t.at < period.end})
    return Contract(
        tenant_name=tenant_name,
        customer_name=customer.name,
        tax_rates=dict(customer.tax_rates),
        tax_inclusive=customer.tax_inclusive,
        plans=plans or [f"{sub.plan_code} v{sub.plan_version}"],
        discounts=[d.model_dump(mode="json") for d in discounts if applies(d, period)],
    )


def applies(d: Discount, period: Period) -> bool:
    """A discount applies to periods that start before it expires and end after it starts."""
    if d.deleted:
        return False
    if d.expires_at is not None and d.expires_at <= period.start:
        return False
    return not (d.starts_at is not None and d.starts_at >= period.end)


def unit_amount(line: LineItem) -> Decimal | None:
    price = line.price
    if isinstance(price, PerUnitPrice) and price.package is None:
        return price.unit_amount
    if isinstance(price, FlatPrice):
        return price.amount
    return None


def to_invoice_line(
    line: LineItem, tax: Decimal, key: str | None = None, adjusts: str | None = None
) -> InvoiceLine:
    return InvoiceLine(
        kind=line.kind.value,
        description=line.description,
        quantity=line.quantity,
        unit_amount=unit_amount(line),
        amount=line.amount,
        exact_amount=line.exact_amount,
        currency=line.currency,
        period_start=line.period_start,
        period_end=line.period_end,
        charge_key=line.charge_key,
        meter_slug=line.meter_slug,
        group=line.group,
        breakdown=list(line.breakdown),
        tax=tax,
        key=key,
        adjusts=adjusts,
    )


def snapshot(usage: UsageData) -> list[UsageSnapshot]:
    out = []
    for key, amounts in usage.items():
        out.append(
            UsageSnapshot(
                meter_slug=key.meter_slug,
                group_by=key.group_by,
                start=key.start,
                end=key.end,
                amounts=[
                    {
                        "quantity": str(a.quantity),
                        **({"group": dict(a.group)} if a.group else {}),
                        **({"events": a.events} if a.events is not None else {}),
                    }
                    for a in amounts
                ],
            )
        )
    return sorted(out, key=lambda s: (s.meter_slug, s.start, s.group_by or ""))


def prior_adjustments(
    sub: Subscription, plans: PlanLookup, prior: PriorPeriod
) -> list[tuple[str, LineItem]]:
    """The earlier period re-rated on its live usage, minus what was billed for it."""
    rerated = usage_lines(sub, plans, prior.period, prior.usage)
    return late_adjustments(rerated, prior.billed, sub.currency, period_label(prior.period))


def netting_lines(
    billed_elsewhere: Sequence[tuple[str | None, InvoiceLine]], currency: str
) -> list[tuple[LineItem, str | None, str | None]]:
    """A replacement invoice re-rates its period in full; what other finalized invoices already
    billed for that period (late-usage adjustment lines naming the voided invoice) is taken off
    again, one line each (``(line, key, adjusts)``; not discounted, taxed like the original)."""
    out: list[tuple[LineItem, str | None, str | None]] = []
    for number, ln in billed_elsewhere:
        where = f"on {number}" if number else "on another invoice"
        line = make_line(
            LineKind.ADJUSTMENT,
            -ln.amount,
            currency,
            quantity=-ln.quantity,
            breakdown=[BreakdownPart(label=f"already billed {where}", amount=-ln.amount)],
            description=f"Already billed {where}: {ln.description}",
            charge_key=ln.charge_key,
            meter_slug=ln.meter_slug,
            group=ln.group,
            period_start=ln.period_start,
            period_end=ln.period_end,
        )
        out.append((line, ln.key, ln.adjusts))
    return out


def compose_invoice(inp: ComposeInput) -> ComposeResult:
    sub, period, currency = inp.sub, inp.period, inp.sub.currency
    base = [*fixed_lines(sub, inp.plans, period), *usage_lines(sub, inp.plans, period, inp.usage)]
    tagged: list[tuple[LineItem, str | None, str | None]] = [(ln, key_of(ln), None) for ln in base]
    tagged.extend(netting_lines(inp.billed_elsewhere, currency))
    credits: list[tuple[str, list[tuple[str, LineItem]]]] = []
    for prior in inp.priors:
        adj = prior_adjustments(sub, inp.plans, prior)
        if not adj:
            continue
        net = sum((ln.amount for _, ln in adj), Decimal(0))
        if net < 0:
            credits.append((prior.invoice_id, adj))
        else:
            tagged.extend((ln, key, prior.invoice_id) for key, ln in adj)
    specs = [
        DiscountSpec(
            id=str(d["id"]),
            percentage=Decimal(str(d["percentage"])) if d.get("percentage") is not None else None,
            amount=Decimal(str(d["amount"])) if d.get("amount") is not None else None,
            charge_key=d.get("charge_key"),
            description=str(d.get("description") or ""),
        )
        for d in inp.contract.discounts
    ]
    lines = [ln for ln, _, _ in tagged]
    tagged.extend((ln, None, None) for ln in discount_lines(lines, specs, currency))
    all_lines = [ln for ln, _, _ in tagged]
    t = document_totals(
        all_lines, inp.contract.tax_rates, currency, inclusive=inp.contract.tax_inclusive
    )
    invoice = Invoice(
        id=inp.invoice_id,
        number=None,
        customer_id=sub.customer_id,
        subscription_id=sub.id,
        period_start=period.start,
        period_end=period.end,
        status=InvoiceStatus.DRAFT,
        currency=currency,
        lines=[
            to_invoice_line(ln, tax, key, adj)
            for (ln, key, adj), tax in zip(tagged, t.line_taxes, strict=True)
        ],
        subtotal=t.subtotal,
        taxes=[TaxAmount(name=n, rate=r, amount=a) for n, r, a in t.taxes],
        tax=t.tax,
        total=t.total,
        tax_inclusive=inp.contract.tax_inclusive,
        revision=inp.revision,
        replaces=inp.replaces,
        contract=inp.contract,
        usage=snapshot({k: inp.usage[k] for k in usage_keys(sub, inp.plans, period)}),
        usage_as_of=inp.now,
        created_at=inp.created_at,
        updated_at=inp.now,
        run_id=inp.run_id,
    )
    return ComposeResult(invoice=invoice, credits=credits)


def compose_many(inputs: Sequence[Sequence[ComposeInput]]) -> list[list[ComposeResult]]:
    """Compose groups of invoices; within a group (one subscription, in period order), each
    invoice sees the adjustments already placed on the previous ones (billed once)."""
    out = []
    for group in inputs:
        done: list[ComposeResult] = []
        placed: list[InvoiceLine] = []
        for inp in group:
            priors = [_with_placed(p, placed) for p in inp.priors]
            res = compose_invoice(replace(inp, priors=priors))
            placed.extend(ln for ln in res.invoice.lines if ln.adjusts and ln.key)
            done.append(res)
        out.append(done)
    return out


def _with_placed(prior: PriorPeriod, placed: Sequence[InvoiceLine]) -> PriorPeriod:
    mine = [ln for ln in placed if ln.adjusts == prior.invoice_id and ln.key]
    if not mine:
        return prior
    return PriorPeriod(
        prior.invoice_id, prior.number, prior.period, prior.usage, add_billed(prior.billed, mine)
    )


def add_billed(
    billed: Mapping[str, Billed], lines: Sequence[InvoiceLine], sign: int = 1
) -> dict[str, Billed]:
    """``billed`` plus the adjustment ``lines`` (``sign=-1`` for credit-note lines, whose
    amounts are the credited, positive, amounts)."""
    out = dict(billed)
    for ln in lines:
        assert ln.key is not None
        old = out.get(ln.key)
        q, a = sign * ln.quantity, sign * ln.amount
        if old is None:
            out[ln.key] = Billed(q, a, ln)
        else:
            out[ln.key] = Billed(old.quantity + q, old.amount + a, old.template)
    return out
