"""Invoice runs and the invoice lifecycle (docs/invoicing.md).

- ``run``: create the invoice of every subscription period that ended (plus the grace period)
  by ``as_of`` and has none yet, for every customer of the tenant. Usage is read set-based
  (``billing.usage``), rating runs in a worker pool (``billing.pool``). Idempotent and
  resumable: ids are deterministic per (tenant, subscription, period, revision), creation
  inserts carry a deduplication token, and a period with an invoice is skipped.
- ``finalize`` (gapless per-tenant numbers), ``void`` (with reason, optional replacement),
  ``refresh`` (a draft re-rated from live usage), credit notes, late usage (adjustment lines on
  the next invoice, or a credit note when the amount went down), the upcoming-invoice preview.

Numbering without transactions: a finalization claims a block of sequence numbers in
``document_numbers`` with ONE insert whose deduplication token is (tenant, kind, first seq); the
claim carries the finalized document and is the commit point. Readers repair an invoice whose
claim exists but whose row is still a draft (a crash between the two writes).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from billing import lifecycle
from billing.audit import record
from billing.catalog import Catalog
from billing.compose import (
    ComposeInput,
    ComposeResult,
    PriorPeriod,
    add_billed,
    new_contract,
    period_label,
    prior_adjustments,
    to_invoice_line,
)
from billing.lease import Lease
from billing.pool import compose_groups
from billing.ports import BillingStore
from billing.usage import counted_meters, fetch_usage
from rating.adjustments import RATED_KINDS, Billed
from rating.invoice import PlanLookup, UsageData, UsageKey, totals, usage_keys
from rating.lines import make_line
from rating.money import round_amount
from rating.periods import Period
from rating.subscriptions import advance, current_period
from rating.tax import document_totals
from schemas.billing import (
    AuditRecord,
    Contract,
    CreditLineIn,
    CreditNote,
    CreditNoteIn,
    Discount,
    DiscountIn,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    RunOut,
    VoidIn,
)
from schemas.catalog import Customer, Subscription, TaxAmount, UpcomingInvoice
from schemas.jsonschema import STORE_MIN
from schemas.pricing import BreakdownPart, LineItem, LineKind
from schemas.timeutil import to_ms, utc_now
from tally.errors import Conflict, NotFound, ValidationError
from tally.gcpause import gc_paused

log = logging.getLogger(__name__)

INVOICE = "invoice"
CREDIT_NOTE = "credit_note"
RUN_LEASE = "invoice-run"
WRITE_CHUNK = 2000

# (tenant, event type, [(object id, data, when it happened)]) -> queues the webhook events
# (billing.webhooks.Webhooks.emit_many)
Notify = Callable[[str, str, Sequence[tuple[str, dict[str, Any], datetime]]], Any]
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class InvoicingConfig:
    grace: timedelta = timedelta(hours=1)
    auto_finalize: bool = False
    workers: int = 0
    lookback: timedelta = timedelta(days=120)
    invoice_prefix: str = "INV"
    credit_prefix: str = "CN"
    run_lease_s: float = 60.0
    run_wait_s: float = 600.0

    @classmethod
    def from_settings(cls, settings: Any) -> InvoicingConfig:
        return cls(
            run_lease_s=settings.invoice_run_lease_s,
            run_wait_s=settings.invoice_run_wait_s,
            grace=settings.invoice_grace,
            auto_finalize=settings.invoice_auto_finalize,
            workers=settings.invoice_run_workers,
            lookback=settings.invoice_adjustment_lookback,
            invoice_prefix=settings.invoice_number_prefix,
            credit_prefix=settings.credit_note_number_prefix,
        )


@dataclass
class _Pending:
    """One invoice to compose: its period and identity (and, on refresh, its contract)."""

    period: Period
    invoice_id: str
    revision: int = 0
    replaces: str | None = None
    contract: Contract | None = None
    created_at: datetime | None = None


@dataclass
class _Context:
    """What composing needs besides the subscription (loaded once per run)."""

    tenant_name: str
    plans: PlanLookup
    customers: dict[str, Customer]
    discounts: dict[str, list[Discount]]
    history: dict[str, list[Invoice]]  # subscription -> its non-void invoices (by period)
    credit_notes: dict[str, list[CreditNote]]  # invoice id -> credit notes
    others: list[Invoice] = field(default_factory=list)
    by_id: dict[str, Invoice] = field(default_factory=dict)  # every loaded invoice, void too


class Invoicing:
    def __init__(
        self,
        rows: BillingStore,
        catalog: Catalog | None = None,
        config: InvoicingConfig | None = None,
        notify: Notify | None = None,
    ) -> None:
        self.rows = rows
        self.catalog = catalog or Catalog(rows)
        self.config = config or InvoicingConfig()
        self.notify = notify
        self._locks: dict[str, threading.RLock] = defaultdict(threading.RLock)
        self._locks_guard = threading.Lock()

    def _lock(self, tenant_id: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks[tenant_id]

    def _emit(
        self,
        tenant_id: str,
        event_type: str,
        object_id: str,
        data: dict[str, Any],
        at: datetime,
    ) -> None:
        self._emit_many(tenant_id, event_type, [(object_id, data, at)])

    def _emit_many(
        self,
        tenant_id: str,
        event_type: str,
        items: Sequence[tuple[str, dict[str, Any], datetime]],
    ) -> None:
        """Queue notifications after the operation's commit point. A crash (or a store error)
        before they are queued loses nothing: the dispatcher's reconciliation
        (``notification_events``) queues whatever a committed change is missing."""
        if self.notify is None or not items:
            return
        try:
            self.notify(tenant_id, event_type, items)
        except Exception:  # a notification must never undo or fail the billing operation
            log.exception("tenant %s: could not queue %d %s", tenant_id, len(items), event_type)

    def _audit_many(
        self,
        tenant_id: str,
        action: str,
        actor: str,
        docs: Sequence[tuple[str, dict[str, Any]]],
        at: datetime,
    ) -> None:
        records = [
            AuditRecord(
                object_type="invoice", object_id=oid, action=action, actor=actor, at=at, data=data
            )
            for oid, data in docs
        ]
        for i in range(0, len(records), 10_000):
            self.rows.append_audit(tenant_id, records[i : i + 10_000])

    # =========================================================================================
    # Reads (with repair of interrupted finalizations)
    # =========================================================================================

    def _repair(self, tenant_id: str, invoices: list[Invoice]) -> list[Invoice]:
        drafts = [i.id for i in invoices if i.status is InvoiceStatus.DRAFT]
        if not drafts:
            return invoices
        claims = self.rows.claims(tenant_id, INVOICE, drafts)
        if not claims:
            return invoices
        fixed = {doc_id: Invoice.model_validate_json(doc) for doc_id, (_, doc) in claims.items()}
        log.info("tenant %s: completing %d interrupted finalization(s)", tenant_id, len(fixed))
        self.rows.write_invoices(tenant_id, list(fixed.values()))
        return [fixed.get(i.id, i) for i in invoices]

    def get_invoice(self, tenant_id: str, invoice_id: str) -> Invoice:
        found = self.rows.invoices(tenant_id, ids=[invoice_id])
        if not found:
            raise NotFound(
                f"invoice {invoice_id!r} not found",
                details=[{"field": "id", "message": "unknown invoice"}],
            )
        inv = self._repair(tenant_id, found)[0]
        notes = self.list_credit_notes(tenant_id, invoice_id=inv.id)
        if notes:
            inv = inv.model_copy(update={"credited": sum((n.total for n in notes), Decimal(0))})
        return inv

    def list_invoices(
        self, tenant_id: str, customer_id: str | None = None, status: InvoiceStatus | None = None
    ) -> list[Invoice]:
        found = self.rows.invoices(tenant_id, customer_id=customer_id)
        found = self._repair(tenant_id, found)
        if status is not None:
            found = [i for i in found if i.status is status]
        return found

    def _repair_credit_notes(self, tenant_id: str) -> None:
        claims = self.rows.claims(tenant_id, CREDIT_NOTE)
        if not claims:
            return
        have = {n.id for n in self.rows.credit_notes(tenant_id, ids=list(claims))}
        for doc_id, (_, doc) in claims.items():
            if doc_id not in have:
                self.rows.write_credit_note(tenant_id, CreditNote.model_validate_json(doc))

    def list_credit_notes(
        self, tenant_id: str, invoice_id: str | None = None, customer_id: str | None = None
    ) -> list[CreditNote]:
        notes = self.rows.credit_notes(
            tenant_id, invoice_ids=[invoice_id] if invoice_id else None, customer_id=customer_id
        )
        claims = self.rows.claims(tenant_id, CREDIT_NOTE)
        have = {n.id for n in notes}
        for doc_id, (_, doc) in claims.items():
            if doc_id in have:
                continue
            note = CreditNote.model_validate_json(doc)
            if (invoice_id is None or note.invoice_id == invoice_id) and (
                customer_id is None or note.customer_id == customer_id
            ):
                self.rows.write_credit_note(tenant_id, note)  # repair
                notes.append(note)
        return sorted(notes, key=lambda n: n.number)

    def get_credit_note(self, tenant_id: str, credit_note_id: str) -> CreditNote:
        for note in self.list_credit_notes(tenant_id):
            if note.id == credit_note_id:
                return note
        raise NotFound(
            f"credit note {credit_note_id!r} not found",
            details=[{"field": "id", "message": "unknown credit note"}],
        )

    # =========================================================================================
    # Notifications a crash lost (billing.webhooks reconciles with these)
    # =========================================================================================

    def notification_events(
        self, tenant_id: str, since: datetime
    ) -> list[tuple[str, str, datetime]]:
        """``(event type, object id, when it happened)`` of every notification that invoices and
        credit notes changed since ``since`` imply. A finalization whose claim is stored but
        whose invoice row is still a draft (a crash between the two) counts as finalized (and
        the row is repaired)."""
        out: list[tuple[str, str, datetime]] = []
        drafts: list[str] = []
        for inv_id, status, number, created, finalized_at, voided_at in self.rows.invoice_heads(
            tenant_id, since
        ):
            out.append(("invoice.created", inv_id, created))
            if number:
                out.append(("invoice.finalized", inv_id, finalized_at or created))
            elif status == InvoiceStatus.DRAFT.value:
                drafts.append(inv_id)
            if status == InvoiceStatus.VOID.value:
                out.append(("invoice.voided", inv_id, voided_at or created))
        if drafts:
            for doc_id, (_, doc) in self.rows.claims(tenant_id, INVOICE, drafts).items():
                inv = Invoice.model_validate_json(doc)
                out.append(("invoice.finalized", doc_id, inv.finalized_at or inv.updated_at))
        for note_id, created in self.rows.credit_note_heads(tenant_id, since):
            out.append(("credit_note.created", note_id, created))
        return out

    def notification_data(
        self, tenant_id: str, wanted: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """The ``data`` of the given notifications (``(event type, object id)``)."""
        inv_ids = sorted({oid for t, oid in wanted if t.startswith("invoice.")})
        note_ids = sorted({oid for t, oid in wanted if t == "credit_note.created"})
        invoices: dict[str, Invoice] = {}
        if inv_ids:
            found = self._repair(tenant_id, self.rows.invoices(tenant_id, ids=inv_ids))
            invoices = {i.id: i for i in found}
        notes = {}
        if note_ids:
            self._repair_credit_notes(tenant_id)
            notes = {n.id: n for n in self.rows.credit_notes(tenant_id, ids=note_ids)}
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for t, oid in wanted:
            if t == "credit_note.created":
                if oid in notes:
                    out[(t, oid)] = note_data(notes[oid])
            elif oid in invoices:
                out[(t, oid)] = event_data(invoices[oid], t)
        return out

    # =========================================================================================
    # Composition (shared by run, refresh, finalize, void+replace)
    # =========================================================================================

    def _context(self, tenant_id: str, subs: Sequence[Subscription], now: datetime) -> _Context:
        plan_keys = {(t.plan_code, t.plan_version) for s in subs for t in s.history}
        plans = self.catalog.plan_versions(tenant_id, plan_keys)
        customer_ids = sorted({s.customer_id for s in subs})
        customers = {
            c.external_id: c for c in self.rows.customers(tenant_id, external_ids=customer_ids)
        }
        discounts: dict[str, list[Discount]] = defaultdict(list)
        for d in self.rows.discounts(tenant_id, customer_ids):
            if not d.deleted:
                discounts[d.customer_id].append(d)
        try:
            since = max(now - self.config.lookback - timedelta(days=400), STORE_MIN)
        except OverflowError:  # an as_of near year 1
            since = STORE_MIN
        invoices = self.rows.invoices(
            tenant_id, subscription_ids=[s.id for s in subs], period_from=since
        )
        invoices = self._repair(tenant_id, invoices)
        history: dict[str, list[Invoice]] = defaultdict(list)
        for inv in invoices:
            if inv.status is not InvoiceStatus.VOID:
                history[inv.subscription_id].append(inv)
        notes: dict[str, list[CreditNote]] = defaultdict(list)
        if any(i.status is InvoiceStatus.FINALIZED for i in invoices):
            for n in self.rows.credit_notes(tenant_id, customer_id=None):
                notes[n.invoice_id].append(n)
        try:
            tenant_name = self.rows.get_tenant(tenant_id).name
        except NotFound:
            tenant_name = tenant_id
        return _Context(
            tenant_name,
            plans,
            customers,
            dict(discounts),
            dict(history),
            dict(notes),
            by_id={i.id: i for i in invoices},
        )

    def _billed_elsewhere(
        self, tenant_id: str, ctx: _Context, sub: Subscription, p: _Pending
    ) -> list[tuple[str | None, InvoiceLine]]:
        """For a replacement: the late-usage adjustments of its period (lines naming an invoice
        it replaces, directly or through a chain of replacements) already on other finalized
        invoices. The replacement re-rates the period in full and nets these out."""
        chain: set[str] = set()
        nxt = p.replaces
        while nxt and nxt not in chain:
            chain.add(nxt)
            prev = ctx.by_id.get(nxt)
            if prev is None:
                found = self.rows.invoices(tenant_id, ids=[nxt])
                prev = found[0] if found else None
            nxt = prev.replaces if prev is not None else None
        out: list[tuple[str | None, InvoiceLine]] = []
        for other in ctx.history.get(sub.id, []):
            if other.status is not InvoiceStatus.FINALIZED or other.id in chain:
                continue
            if other.id == p.invoice_id:
                continue
            for ln in other.lines:
                if ln.adjusts in chain and ln.key and ln.kind == LineKind.ADJUSTMENT.value:
                    out.append((other.number, ln))
        return out

    def _priors(
        self, ctx: _Context, sub: Subscription, before: datetime, exclude: set[str], now: datetime
    ) -> list[tuple[Invoice, dict[str, Billed]]]:
        """Finalized invoices of ``sub`` ending by ``before`` (within the lookback) and what was
        billed for each so far (its lines + adjustments elsewhere, minus automatic credits)."""
        out = []
        docs = ctx.history.get(sub.id, [])
        horizon = before - self.config.lookback
        for f in docs:
            if f.status is not InvoiceStatus.FINALIZED or f.id in exclude:
                continue
            if f.period_end > before or f.period_end < horizon:
                continue
            billed: dict[str, Billed] = {}
            for ln in f.lines:
                if ln.kind in RATED_KINDS and ln.key:
                    billed = add_billed(billed, [ln])
            for other in docs:
                if other.id in exclude or other.id == f.id:
                    continue
                adj = [ln for ln in other.lines if ln.adjusts == f.id and ln.key]
                billed = add_billed(billed, adj)
            for note in ctx.credit_notes.get(f.id, []):
                adj = [ln for ln in note.lines if ln.adjusts == f.id and ln.key]
                billed = add_billed(billed, adj, sign=-1)
            out.append((f, billed))
        return sorted(out, key=lambda fb: fb[0].period_start)

    def _changed(self, inv: Invoice, usage: UsageData, billed: dict[str, Billed]) -> bool:
        """Whether re-rating ``inv``'s period can give anything: its usage moved, or something
        was already adjusted for it."""
        from billing.compose import snapshot

        if snapshot(usage) != inv.usage:
            return True
        own = {ln.key: ln.amount for ln in inv.lines if ln.key and ln.kind in RATED_KINDS}
        return any(own.get(k) != b.amount for k, b in billed.items())

    def _build(
        self,
        tenant_id: str,
        ctx: _Context,
        work: Sequence[tuple[Subscription, list[_Pending]]],
        now: datetime,
        run_id: str | None,
        exclude: set[str] | None = None,
    ) -> list[list[ComposeInput]]:
        """Compose inputs, one group per subscription (periods in order); usage of every group
        is read in a few set-based queries."""
        exclude = exclude or set()
        needs: dict[str, set[UsageKey]] = defaultdict(set)
        plan_list = list(ctx.plans.values())
        prior_map: dict[str, list[tuple[Invoice, dict[str, Billed]]]] = {}
        for sub, pendings in work:
            first = min(p.period.start for p in pendings)
            prior_map[sub.id] = self._priors(ctx, sub, first, exclude, now)
            for p in pendings:
                needs[sub.customer_id].update(usage_keys(sub, ctx.plans, p.period))
            for f, _ in prior_map[sub.id]:
                needs[sub.customer_id].update(
                    usage_keys(sub, ctx.plans, Period(f.period_start, f.period_end))
                )
        usage = fetch_usage(self.rows, tenant_id, needs, counted_meters(plan_list))
        groups: list[list[ComposeInput]] = []
        for sub, pendings in work:
            cu = usage.get(sub.customer_id, {})
            customer = ctx.customers.get(sub.customer_id)
            priors: list[PriorPeriod] = []
            for f, billed in prior_map[sub.id]:
                fp = Period(f.period_start, f.period_end)
                pu = {k: cu.get(k, []) for k in usage_keys(sub, ctx.plans, fp)}
                if self._changed(f, pu, billed):
                    priors.append(PriorPeriod(f.id, f.number, fp, pu, billed))
            group = []
            for i, p in enumerate(sorted(pendings, key=lambda x: x.period.start)):
                contract = p.contract
                if contract is None:
                    if customer is None:
                        raise NotFound(
                            f"customer {sub.customer_id!r} of {sub.id} not found",
                            details=[{"field": "customer_id", "message": "unknown customer"}],
                        )
                    contract = new_contract(
                        ctx.tenant_name,
                        customer,
                        sub,
                        p.period,
                        ctx.discounts.get(sub.customer_id, []),
                    )
                group.append(
                    ComposeInput(
                        invoice_id=p.invoice_id,
                        revision=p.revision,
                        sub=sub,
                        plans=ctx.plans,
                        period=p.period,
                        usage={k: cu.get(k, []) for k in usage_keys(sub, ctx.plans, p.period)},
                        contract=contract,
                        now=now,
                        created_at=p.created_at or now,
                        priors=priors if i == 0 else [],
                        run_id=run_id,
                        replaces=p.replaces,
                        billed_elsewhere=(
                            self._billed_elsewhere(tenant_id, ctx, sub, p) if p.replaces else ()
                        ),
                    )
                )
            groups.append(group)
        return groups

    # =========================================================================================
    # The invoice run
    # =========================================================================================

    def run(
        self,
        tenant_id: str,
        as_of: datetime | None = None,
        actor: str = "api",
        progress: Progress | None = None,
    ) -> RunOut:
        now = utc_now()
        as_of = to_ms(as_of) if as_of is not None else now
        if as_of > now + timedelta(seconds=1):
            raise ValidationError(
                "as_of must not be in the future (a period is closed on the usage stored by then)",
                details=[{"field": "as_of", "message": "in the future"}],
            )
        step = progress or (lambda _s, _d, _t: None)
        with self._lock(tenant_id):
            # One run per tenant at a time across processes (API replicas, the CLI): a second
            # run waits for the first and then finds its invoices existing, so `created` lists
            # an invoice in exactly one run's answer.
            lease = Lease(self.rows, tenant_id, RUN_LEASE, self.config.run_lease_s)
            if not lease.hold():
                step("waiting for another run", 0, 0)
            if not lease.held and not lease.wait(self.config.run_wait_s):
                holder = lease.holder()
                raise Conflict(
                    f"another invoice run of this tenant is in progress (holder "
                    f"{holder.owner[:12] if holder else '?'}); retry when it has finished",
                    details=[{"field": "as_of", "message": "a run is in progress"}],
                )
            lease.keep_renewed()
            try:
                with gc_paused():
                    return self._run(tenant_id, as_of, now, actor, step)
            finally:
                lease.release()

    def _run(
        self, tenant_id: str, as_of: datetime, now: datetime, actor: str, step: Progress
    ) -> RunOut:
        run_id = "run_" + uuid.uuid4().hex[:16]
        step("list", 0, 0)
        self._repair_credit_notes(tenant_id)
        subs = [advance(s, as_of) for s in self.rows.subscriptions(tenant_id)]
        have = {(sub_id, start) for _, sub_id, start, _, _ in self.rows.invoice_keys(tenant_id)}
        work: list[tuple[Subscription, list[_Pending]]] = []
        existing = 0
        for sub in subs:
            pend = []
            for period in lifecycle.closed_periods(sub, as_of, self.config.grace):
                if (sub.id, period.start) in have:
                    existing += 1
                    continue
                pend.append(_Pending(period, lifecycle.invoice_id(tenant_id, sub.id, period)))
            if pend:
                work.append((sub, pend))
        total = sum(len(p) for _, p in work)
        step("plan", 0, total)
        created: list[str] = []
        finalized: list[str] = []
        credit_ids: list[str] = []
        with_work = {w[0].id for w in work}
        late_subs = [s for s in subs if s.id not in with_work]
        if work or late_subs:
            ctx = self._context(tenant_id, subs, as_of)
            groups = self._build(tenant_id, ctx, work, now, run_id) if work else []
            results = compose_groups(groups, self.config.workers, lambda d: step("rate", d, total))
            invoices = [r.invoice for group in results for r in group]
            for i in range(0, len(invoices), WRITE_CHUNK):
                self.rows.write_invoices(tenant_id, invoices[i : i + WRITE_CHUNK], create=True)
                step("write", min(i + WRITE_CHUNK, len(invoices)), total)
            owners = self.rows.invoice_run_ids(tenant_id, [i.id for i in invoices])
            mine = [i for i in invoices if owners.get(i.id) == run_id]
            existing += len(invoices) - len(mine)
            created = [i.id for i in mine]
            credits = [c for group in results for r in group for c in r.credits]
            credits += self._late_credits(tenant_id, ctx, late_subs, as_of, now)
            for inv_id, adj in credits:
                note = self._automatic_credit_note(tenant_id, ctx, inv_id, adj, now)
                if note is not None:
                    credit_ids.append(note.id)
            self._audit_many(
                tenant_id,
                "created",
                actor,
                [
                    (
                        i.id,
                        {"run_id": run_id, "total": str(i.total), "as_of": as_of.isoformat()},
                    )
                    for i in mine
                ],
                now,
            )
            self._emit_many(
                tenant_id,
                "invoice.created",
                [(i.id, event_data(i, "invoice.created"), i.created_at) for i in mine],
            )
            if self.config.auto_finalize and mine:
                done = self._finalize_many(tenant_id, mine, actor, now)
                finalized = [i.id for i in done]
        step("done", total, total)
        return RunOut(
            created=sorted(created),
            existing=existing,
            finalized=sorted(finalized),
            credit_notes=credit_ids,
        )

    def _late_credits(
        self,
        tenant_id: str,
        ctx: _Context,
        subs: Sequence[Subscription],
        as_of: datetime,
        now: datetime,
    ) -> list[tuple[str, list[tuple[str, LineItem]]]]:
        """Finalized periods (of subscriptions without a new invoice in this run) whose
        re-rating went down: they get a credit note now (increases wait for the next invoice)."""
        candidates = [
            s
            for s in subs
            if any(i.status is InvoiceStatus.FINALIZED for i in ctx.history.get(s.id, []))
        ]
        if not candidates:
            return []
        needs: dict[str, set[UsageKey]] = defaultdict(set)
        priors: dict[str, list[tuple[Invoice, dict[str, Billed]]]] = {}
        for sub in candidates:
            priors[sub.id] = self._priors(ctx, sub, as_of, set(), now)
            for f, _ in priors[sub.id]:
                needs[sub.customer_id].update(
                    usage_keys(sub, ctx.plans, Period(f.period_start, f.period_end))
                )
        usage = fetch_usage(self.rows, tenant_id, needs, counted_meters(ctx.plans.values()))
        out = []
        for sub in candidates:
            cu = usage.get(sub.customer_id, {})
            for f, billed in priors[sub.id]:
                fp = Period(f.period_start, f.period_end)
                pu = {k: cu.get(k, []) for k in usage_keys(sub, ctx.plans, fp)}
                if not self._changed(f, pu, billed):
                    continue
                adj = prior_adjustments(sub, ctx.plans, PriorPeriod(f.id, f.number, fp, pu, billed))
                if adj and sum((ln.amount for _, ln in adj), Decimal(0)) < 0:
                    out.append((f.id, adj))
        return out

    # =========================================================================================
    # Numbering
    # =========================================================================================

    def _claim(
        self, tenant_id: str, kind: str, docs: Sequence[tuple[str, Callable[[int], str]]]
    ) -> dict[str, int]:
        """Gapless numbers for ``docs`` (``(document id, seq -> finalized doc JSON)``); a
        document that already holds a number keeps it. Returns document id -> seq."""
        got: dict[str, int] = {}
        todo = list(docs)
        for _attempt in range(100):
            if not todo:
                return got
            top, held = self.rows.number_state(tenant_id, kind, [d for d, _ in todo])
            got.update(held)
            todo = [(d, f) for d, f in todo if d not in held]
            if not todo:
                return got
            first = top + 1
            block = [(d, f(first + i)) for i, (d, f) in enumerate(todo)]
            winners = self.rows.claim_numbers(tenant_id, kind, first, block)
            for i, (d, _) in enumerate(todo):
                if winners.get(first + i) == d:
                    got[d] = first + i
            todo = [(d, f) for d, f in todo if d not in got]
        raise Conflict(
            "could not claim a document number (too much contention); retry",
            details=[{"field": "number", "message": "contention"}],
        )

    def _finalize_many(
        self, tenant_id: str, invoices: Sequence[Invoice], actor: str, now: datetime
    ) -> list[Invoice]:
        prefix = self.config.invoice_prefix

        def finalized(inv: Invoice, seq: int) -> Invoice:
            return inv.model_copy(
                update={
                    "status": InvoiceStatus.FINALIZED,
                    "number": lifecycle.format_number(prefix, seq),
                    "finalized_at": now,
                    "updated_at": now,
                }
            )

        by_id = {i.id: i for i in invoices}
        seqs = self._claim(
            tenant_id,
            INVOICE,
            [(i.id, _bind(finalized, i)) for i in invoices],
        )
        claims = self.rows.claims(tenant_id, INVOICE, list(seqs))
        done = [Invoice.model_validate_json(claims[d][1]) for d in by_id if d in claims]
        for i in range(0, len(done), WRITE_CHUNK):
            self.rows.write_invoices(tenant_id, done[i : i + WRITE_CHUNK])
        self._audit_many(
            tenant_id,
            "finalized",
            actor,
            [(i.id, {"number": i.number, "total": str(i.total)}) for i in done],
            now,
        )
        self._emit_many(
            tenant_id,
            "invoice.finalized",
            [(i.id, event_data(i, "invoice.finalized"), i.finalized_at or now) for i in done],
        )
        return done

    # =========================================================================================
    # Lifecycle
    # =========================================================================================

    def _recompose(
        self,
        tenant_id: str,
        inv: Invoice,
        now: datetime,
        *,
        fresh_contract: bool = False,
        new_id: str | None = None,
        revision: int | None = None,
    ) -> ComposeResult:
        sub = advance(self.catalog.get_subscription(tenant_id, inv.subscription_id), now)
        ctx = self._context(tenant_id, [sub], inv.period_start)
        pend = _Pending(
            Period(inv.period_start, inv.period_end),
            new_id or inv.id,
            inv.revision if revision is None else revision,
            inv.id if new_id else inv.replaces,
            None if fresh_contract else inv.contract,
            now if new_id else inv.created_at,
        )
        groups = self._build(tenant_id, ctx, [(sub, [pend])], now, inv.run_id, exclude={inv.id})
        return compose_groups(groups, 1)[0][0]

    def refresh(
        self, tenant_id: str, invoice_id: str, actor: str = "api", now: datetime | None = None
    ) -> Invoice:
        at = to_ms(now) if now else utc_now()
        with self._lock(tenant_id):
            inv = self.get_invoice(tenant_id, invoice_id)
            lifecycle.check(inv.id, inv.status, "refresh")
            res = self._recompose(tenant_id, inv, at)
            fresh = res.invoice.model_copy(update={"created_at": inv.created_at})
            self.rows.write_invoices(tenant_id, [fresh])
            record(
                self.rows,
                tenant_id,
                "invoice",
                inv.id,
                "refreshed",
                actor,
                {"total": str(fresh.total)},
                at,
            )
            return fresh

    def finalize(
        self, tenant_id: str, invoice_id: str, actor: str = "api", now: datetime | None = None
    ) -> Invoice:
        """Re-rate the draft on live usage, then freeze it with the next gapless number."""
        at = to_ms(now) if now else utc_now()
        with self._lock(tenant_id):
            inv = self.get_invoice(tenant_id, invoice_id)
            lifecycle.check(inv.id, inv.status, "finalize")
            fresh = self._recompose(tenant_id, inv, at).invoice
            fresh = fresh.model_copy(update={"created_at": inv.created_at})
            return self._finalize_many(tenant_id, [fresh], actor, at)[0]

    def void(
        self,
        tenant_id: str,
        invoice_id: str,
        req: VoidIn,
        actor: str = "api",
        now: datetime | None = None,
    ) -> Invoice:
        at = to_ms(now) if now else utc_now()
        with self._lock(tenant_id):
            inv = self.get_invoice(tenant_id, invoice_id)
            lifecycle.check(inv.id, inv.status, "void")
            if self.list_credit_notes(tenant_id, invoice_id=inv.id):
                raise Conflict(
                    f"cannot void invoice {inv.id}: it has credit notes; credit the rest instead",
                    details=[{"field": "status", "message": "has credit notes"}],
                )
            replacement: Invoice | None = None
            if req.replace:
                rev = inv.revision + 1
                new_id = lifecycle.invoice_id(
                    tenant_id, inv.subscription_id, Period(inv.period_start, inv.period_end), rev
                )
                replacement = self._recompose(
                    tenant_id, inv, at, fresh_contract=True, new_id=new_id, revision=rev
                ).invoice
            voided = inv.model_copy(
                update={
                    "status": InvoiceStatus.VOID,
                    "void_reason": req.reason,
                    "voided_at": at,
                    "updated_at": at,
                    "replaced_by": replacement.id if replacement else None,
                    "credited": Decimal(0),
                }
            )
            if replacement is not None:
                self.rows.write_invoices(tenant_id, [replacement], create=True)
            self.rows.write_invoices(tenant_id, [voided])
            record(
                self.rows,
                tenant_id,
                "invoice",
                inv.id,
                "voided",
                actor,
                {"reason": req.reason, "replaced_by": voided.replaced_by},
                at,
            )
            self._emit(
                tenant_id, "invoice.voided", inv.id, event_data(voided, "invoice.voided"), at
            )
            if replacement is not None:
                record(
                    self.rows,
                    tenant_id,
                    "invoice",
                    replacement.id,
                    "created",
                    actor,
                    {"replaces": inv.id, "total": str(replacement.total)},
                    at,
                )
                self._emit(
                    tenant_id,
                    "invoice.created",
                    replacement.id,
                    event_data(replacement, "invoice.created"),
                    replacement.created_at,
                )
            return voided

    # =========================================================================================
    # Credit notes
    # =========================================================================================

    def _issue(
        self,
        tenant_id: str,
        inv: Invoice,
        lines: list[LineItem],
        keys: list[tuple[str | None, str | None]],
        reason: str,
        automatic: bool,
        actor: str,
        now: datetime,
        note_key: str,
    ) -> CreditNote:
        """Number and store a credit note of ``lines`` (positive = credited) against ``inv``,
        taxed like the invoice (its contract's rates and mode)."""
        t = document_totals(
            lines, inv.contract.tax_rates, inv.currency, inclusive=inv.contract.tax_inclusive
        )
        note_id = lifecycle.credit_note_id(tenant_id, inv.id, note_key)
        base = CreditNote(
            id=note_id,
            number="",
            invoice_id=inv.id,
            invoice_number=inv.number,
            customer_id=inv.customer_id,
            currency=inv.currency,
            reason=reason,
            automatic=automatic,
            lines=[
                to_invoice_line(ln, tax, key, adjusts)
                for ln, tax, (key, adjusts) in zip(lines, t.line_taxes, keys, strict=True)
            ],
            subtotal=t.subtotal,
            taxes=[TaxAmount(name=n, rate=r, amount=a) for n, r, a in t.taxes],
            tax=t.tax,
            total=t.total,
            tax_inclusive=inv.contract.tax_inclusive,
            contract=inv.contract,
            created_at=now,
        )
        prefix = self.config.credit_prefix

        def numbered(seq: int) -> str:
            return base.model_copy(
                update={"number": lifecycle.format_number(prefix, seq)}
            ).model_dump_json()

        seq = self._claim(tenant_id, CREDIT_NOTE, [(note_id, numbered)])[note_id]
        claims = self.rows.claims(tenant_id, CREDIT_NOTE, [note_id])
        note = (
            CreditNote.model_validate_json(claims[note_id][1])
            if note_id in claims
            else (base.model_copy(update={"number": lifecycle.format_number(prefix, seq)}))
        )
        self.rows.write_credit_note(tenant_id, note)
        record(
            self.rows,
            tenant_id,
            "credit_note",
            note.id,
            "created",
            actor,
            {
                "invoice_id": inv.id,
                "number": note.number,
                "total": str(note.total),
                "reason": reason,
            },
            now,
        )
        self._emit(tenant_id, "credit_note.created", note.id, note_data(note), note.created_at)
        return note

    def _automatic_credit_note(
        self,
        tenant_id: str,
        ctx: _Context,
        invoice_id: str,
        adj: list[tuple[str, LineItem]],
        now: datetime,
    ) -> CreditNote | None:
        inv = next((i for docs in ctx.history.values() for i in docs if i.id == invoice_id), None)
        if inv is None:
            return None
        lines = [
            ln.model_copy(
                update={
                    "amount": -ln.amount,
                    "quantity": -ln.quantity,
                    "exact_amount": str(-ln.amount),
                    "kind": LineKind.CREDIT,
                }
            )
            for _, ln in adj
        ]
        keys: list[tuple[str | None, str | None]] = [(k, inv.id) for k, _ in adj]
        # Deterministic per (invoice, what is credited): a retried run issues it once.
        note_key = (
            "late:"
            + "|".join(f"{k}={ln.amount}" for k, ln in adj)
            + f"@{len(ctx.credit_notes.get(inv.id, []))}"
        )
        existing = {n.id for n in ctx.credit_notes.get(inv.id, [])}
        if lifecycle.credit_note_id(tenant_id, inv.id, note_key) in existing:
            return None
        return self._issue(
            tenant_id,
            inv,
            lines,
            keys,
            f"late usage correction for {period_label(Period(inv.period_start, inv.period_end))}",
            True,
            "system",
            now,
            note_key,
        )

    def create_credit_note(
        self,
        tenant_id: str,
        invoice_id: str,
        req: CreditNoteIn,
        actor: str = "api",
        now: datetime | None = None,
    ) -> CreditNote:
        """Credit the whole invoice, some lines (fully or partly), or a lump sum. What is
        credited in total never exceeds what was invoiced (per line and overall)."""
        at = to_ms(now) if now else utc_now()
        with self._lock(tenant_id):
            inv = self.get_invoice(tenant_id, invoice_id)
            lifecycle.check(inv.id, inv.status, "credit")
            previous = self.list_credit_notes(tenant_id, invoice_id=inv.id)
            credited_line: dict[int, Decimal] = defaultdict(Decimal)
            for note in previous:
                for ln in note.lines:
                    if ln.key and ln.key.startswith("line:"):
                        credited_line[int(ln.key[5:])] += ln.amount
            lines: list[LineItem] = []
            keys: list[tuple[str | None, str | None]] = []
            if req.amount is not None:
                net = inv.subtotal if not inv.tax_inclusive else inv.total
                already = sum(
                    (n.subtotal if not n.tax_inclusive else n.total for n in previous), Decimal(0)
                )
                if round_amount(req.amount, inv.currency) != req.amount:
                    raise ValidationError(
                        f"amount has more decimals than {inv.currency} allows",
                        details=[{"field": "amount", "message": "too many decimals"}],
                    )
                if net - already <= 0:
                    raise Conflict(
                        f"invoice {inv.id} has nothing left to credit",
                        details=[{"field": "amount", "message": "fully credited"}],
                    )
                if req.amount > net - already:
                    raise ValidationError(
                        f"amount {req.amount} exceeds what is left to credit ({net - already})",
                        details=[{"field": "amount", "message": "exceeds the invoice"}],
                    )
                lines.append(
                    make_line(
                        LineKind.CREDIT,
                        req.amount,
                        inv.currency,
                        quantity=Decimal(1),
                        description=f"Credit: {req.reason}",
                    )
                )
                keys.append((None, None))
            else:
                wanted: Sequence[CreditLineIn | _CreditAll] = req.lines or [
                    _CreditAll(i) for i in range(len(inv.lines))
                ]
                for j, item in enumerate(wanted):
                    idx = item.line
                    if idx >= len(inv.lines):
                        raise ValidationError(
                            f"lines.{j}.line: the invoice has {len(inv.lines)} lines",
                            details=[{"field": f"lines.{j}.line", "message": "no such line"}],
                        )
                    src = inv.lines[idx]
                    left = src.amount - credited_line[idx]
                    amount = item.amount if item.amount is not None else left
                    if src.amount <= 0 or left <= 0:
                        if req.lines is None:
                            continue
                        raise ValidationError(
                            f"lines.{j}.line: nothing left to credit on line {idx}",
                            details=[{"field": f"lines.{j}.line", "message": "nothing to credit"}],
                        )
                    if amount > left or round_amount(amount, inv.currency) != amount:
                        raise ValidationError(
                            f"lines.{j}.amount: at most {left} in {inv.currency} units",
                            details=[
                                {
                                    "field": f"lines.{j}.amount",
                                    "message": "too large or too precise",
                                }
                            ],
                        )
                    lines.append(
                        make_line(
                            LineKind.CREDIT,
                            amount,
                            inv.currency,
                            quantity=src.quantity if amount == src.amount else Decimal(0),
                            description=f"Credit: {src.description}",
                            charge_key=src.charge_key,
                            meter_slug=src.meter_slug,
                            group=src.group,
                            period_start=src.period_start,
                            period_end=src.period_end,
                            breakdown=[
                                BreakdownPart(label=f"of line {idx} ({src.amount})", amount=amount)
                            ],
                        )
                    )
                    keys.append((f"line:{idx}", None))
                if not lines:
                    raise Conflict(
                        f"invoice {inv.id} has nothing left to credit",
                        details=[{"field": "lines", "message": "fully credited"}],
                    )
                # Credit notes of an amount are not tied to lines: the total stays capped.
                net = inv.subtotal if not inv.tax_inclusive else inv.total
                already = sum(
                    (n.subtotal if not n.tax_inclusive else n.total for n in previous), Decimal(0)
                )
                left = net - already
                asked = sum((ln.amount for ln in lines), Decimal(0))
                if asked > left:
                    if req.lines is not None:
                        raise ValidationError(
                            f"the lines credit {asked}, more than is left to credit ({left}): "
                            "earlier credit notes of an amount are not tied to lines",
                            details=[{"field": "lines", "message": "exceeds the invoice"}],
                        )
                    if left <= 0:
                        raise Conflict(
                            f"invoice {inv.id} has nothing left to credit",
                            details=[{"field": "lines", "message": "fully credited"}],
                        )
                    # the whole invoice = everything left, as one amount
                    lines = [
                        make_line(
                            LineKind.CREDIT,
                            left,
                            inv.currency,
                            quantity=Decimal(1),
                            description=f"Credit: {req.reason}",
                        )
                    ]
                    keys = [(None, None)]
            note_key = f"manual:{len(previous)}"
            return self._issue(tenant_id, inv, lines, keys, req.reason, False, actor, at, note_key)

    # =========================================================================================
    # Upcoming invoice (with pending late-usage adjustments)
    # =========================================================================================

    def upcoming_invoice(
        self, tenant_id: str, customer_id: str, now: datetime | None = None
    ) -> UpcomingInvoice:
        at = to_ms(now) if now else utc_now()
        upcoming = self.catalog.upcoming_invoice(tenant_id, customer_id, at)
        sub = advance(self.catalog.get_subscription(tenant_id, upcoming.subscription_id), at)
        ctx = self._context(tenant_id, [sub], at)
        period = current_period(sub, at)
        priors = self._priors(ctx, sub, period.start, set(), at)
        if not priors:
            return upcoming
        needs = {
            sub.customer_id: {
                k
                for f, _ in priors
                for k in usage_keys(sub, ctx.plans, Period(f.period_start, f.period_end))
            }
        }
        cu = fetch_usage(self.rows, tenant_id, needs, counted_meters(ctx.plans.values()))[
            sub.customer_id
        ]
        extra: list[LineItem] = []
        for f, billed in priors:
            fp = Period(f.period_start, f.period_end)
            pu = {k: cu.get(k, []) for k in usage_keys(sub, ctx.plans, fp)}
            adj = prior_adjustments(sub, ctx.plans, PriorPeriod(f.id, f.number, fp, pu, billed))
            if adj and sum((ln.amount for _, ln in adj), Decimal(0)) >= 0:
                extra.extend(ln for _, ln in adj)
        if not extra:
            return upcoming
        lines = [*upcoming.lines, *extra]
        customer = self.catalog.get_customer(tenant_id, customer_id)
        subtotal, taxes, tax, total = totals(lines, customer.tax_rates, upcoming.currency)
        return upcoming.model_copy(
            update={
                "lines": lines,
                "subtotal": subtotal,
                "taxes": taxes,
                "tax": tax,
                "total": total,
            }
        )

    # =========================================================================================
    # Discounts
    # =========================================================================================

    def add_discount(
        self, tenant_id: str, customer_id: str, req: DiscountIn, actor: str = "api"
    ) -> Discount:
        self.catalog.get_customer(tenant_id, customer_id)
        now = utc_now()
        d = Discount(
            **req.model_dump(),
            id="dsc_" + uuid.uuid4().hex[:20],
            customer_id=customer_id,
            created_at=now,
        )
        self.rows.write_discount(tenant_id, d)
        record(
            self.rows, tenant_id, "discount", d.id, "created", actor, d.model_dump(mode="json"), now
        )
        return d

    def list_discounts(self, tenant_id: str, customer_id: str) -> list[Discount]:
        self.catalog.get_customer(tenant_id, customer_id)
        return [d for d in self.rows.discounts(tenant_id, [customer_id]) if not d.deleted]

    def delete_discount(
        self, tenant_id: str, customer_id: str, discount_id: str, actor: str = "api"
    ) -> Discount:
        for d in self.list_discounts(tenant_id, customer_id):
            if d.id == discount_id:
                gone = d.model_copy(update={"deleted": True})
                self.rows.write_discount(tenant_id, gone)
                record(self.rows, tenant_id, "discount", d.id, "deleted", actor, {})
                return gone
        raise NotFound(
            f"discount {discount_id!r} not found",
            details=[{"field": "discount_id", "message": "unknown discount"}],
        )


@dataclass(frozen=True)
class _CreditAll:
    line: int
    amount: Decimal | None = None


def _bind(fn: Callable[[Invoice, int], Invoice], inv: Invoice) -> Callable[[int], str]:
    def doc(seq: int) -> str:
        return fn(inv, seq).model_dump_json()

    return doc


_STATUS_OF_EVENT = {
    "invoice.created": InvoiceStatus.DRAFT,
    "invoice.finalized": InvoiceStatus.FINALIZED,
    "invoice.voided": InvoiceStatus.VOID,
}


def event_data(inv: Invoice, event_type: str) -> dict[str, Any]:
    """The ``data`` of an invoice notification: the invoice as the event left it (so that the
    live notification and one queued later by the reconciliation say the same)."""
    status = _STATUS_OF_EVENT[event_type]
    return {
        "id": inv.id,
        "number": None if status is InvoiceStatus.DRAFT else inv.number,
        "customer_id": inv.customer_id,
        "subscription_id": inv.subscription_id,
        "period_start": inv.period_start.isoformat(),
        "period_end": inv.period_end.isoformat(),
        "status": status.value,
        "currency": inv.currency,
        "total": str(inv.total),
    }


def note_data(note: CreditNote) -> dict[str, Any]:
    return {
        "id": note.id,
        "number": note.number,
        "invoice_id": note.invoice_id,
        "customer_id": note.customer_id,
        "currency": note.currency,
        "total": str(note.total),
        "reason": note.reason,
    }


def invoice_ids(invoices: Iterable[Invoice]) -> list[str]:
    return [i.id for i in invoices]


__all__ = ["InvoiceLine", "Invoicing", "InvoicingConfig"]
