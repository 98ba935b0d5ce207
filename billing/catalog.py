"""Catalog use-cases: plans (immutable versions), customers, subscriptions (the state machine of
``rating.subscriptions``), the upcoming invoice and the rating preview.

Storage goes through ``billing.ports.BillingStore``. Read-modify-write operations run under one
lock per ``Catalog`` (keep one per process); across processes, plan versions are
first-writer-wins and subscription updates check the revision they started from (409 on a
concurrent change). State changes of plans and subscriptions are written to the audit trail.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

from billing.audit import record
from billing.ports import BillingStore
from billing.usage import counted_meters, fetch_usage
from rating.invoice import assemble_upcoming_invoice, preview_plan_lines, totals, usage_keys
from rating.lines import rate_charge_lines
from rating.subscriptions import (
    advance,
    apply_action,
    change_plan,
    current_period,
    new_subscription,
)
from schemas.catalog import (
    ActionIn,
    ChangePlanIn,
    Customer,
    CustomerIn,
    CustomerPatch,
    PlanDraft,
    PlanVersion,
    PreviewIn,
    PreviewOut,
    Subscription,
    SubscriptionIn,
    SubscriptionStatus,
    UpcomingInvoice,
)
from schemas.pricing import PlanSpec, parse_price
from schemas.timeutil import to_ms, utc_now
from tally.errors import Conflict, NotFound, ValidationError, detail, pydantic_details, summarize

log = logging.getLogger(__name__)


def _now(now: datetime | None) -> datetime:
    return to_ms(now) if now is not None else utc_now()


def _invalid(exc: Any, prefix: str = "") -> ValidationError:
    details = pydantic_details(exc, prefix)
    return ValidationError(summarize(details), details=details)


class Catalog:
    """Plans, customers and subscriptions of every tenant, through a ``BillingStore``."""

    def __init__(self, rows: BillingStore) -> None:
        self.rows = rows
        self._lock = threading.RLock()

    # --- plans --------------------------------------------------------------------------------

    def _check_meters(self, tenant_id: str, spec: PlanSpec) -> None:
        """Every metered charge names an existing meter, and its group_by is a dimension of it."""
        problems = []
        for i, charge in enumerate(spec.charges):
            if charge.meter_slug is None:
                continue
            try:
                meter = self.rows.get_meter(tenant_id, charge.meter_slug)
            except NotFound:
                problems.append(
                    {
                        "field": f"charges.{i}.meter_slug",
                        "message": f"unknown meter {charge.meter_slug!r}",
                    }
                )
                continue
            if charge.group_by is not None and charge.group_by not in meter.group_by:
                dims = ", ".join(sorted(meter.group_by)) or "none"
                problems.append(
                    {
                        "field": f"charges.{i}.group_by",
                        "message": f"meter {charge.meter_slug!r} has no dimension "
                        f"{charge.group_by!r} (it has: {dims})",
                    }
                )
        if problems:
            raise ValidationError(
                "; ".join(f"{p['field']}: {p['message']}" for p in problems), details=problems
            )

    def _insert_plan(self, tenant_id: str, plan: PlanVersion, actor: str = "api") -> PlanVersion:
        self.rows.insert_plan(tenant_id, plan)
        # First writer wins: if another process published this version first, say so.
        stored = self.get_plan(tenant_id, plan.code, plan.version)
        if stored != plan:
            raise Conflict(
                f"plan {plan.code} v{plan.version} was published concurrently; retry",
                field="code",
            )
        record(
            self.rows,
            tenant_id,
            "plan",
            f"{plan.code}/v{plan.version}",
            "published",
            actor,
            {"code": plan.code, "version": plan.version},
        )
        return plan

    def create_plan(
        self, tenant_id: str, spec: PlanSpec, now: datetime | None = None, actor: str = "api"
    ) -> PlanVersion:
        """Create plan ``spec.code`` as version 1 (409 if the code exists)."""
        with self._lock:
            if self.rows.plans(tenant_id, code=spec.code):
                raise Conflict(
                    f"plan {spec.code!r} already exists; publish a new version with "
                    f"POST /v1/plans/{spec.code}/versions",
                    field="code",
                )
            self._check_meters(tenant_id, spec)
            plan = PlanVersion(**spec.model_dump(), version=1, created_at=_now(now))
            return self._insert_plan(tenant_id, plan, actor)

    def publish_version(
        self,
        tenant_id: str,
        code: str,
        draft: PlanDraft,
        now: datetime | None = None,
        actor: str = "api",
    ) -> PlanVersion:
        """Publish the next version of ``code``; omitted fields are copied from the latest."""
        with self._lock:
            latest = self.get_plan(tenant_id, code)
            data = latest.spec().model_dump()
            # omitted (null) top-level fields are copied; nested nulls stay (a tier's open up_to)
            data.update({k: v for k, v in draft.model_dump().items() if v is not None})
            try:
                spec = PlanSpec.model_validate(data)
            except Exception as exc:  # pydantic: a cross-field rule of the merged plan
                if hasattr(exc, "errors"):
                    raise _invalid(exc) from None
                raise
            self._check_meters(tenant_id, spec)
            plan = PlanVersion(
                **spec.model_dump(), version=latest.version + 1, created_at=_now(now)
            )
            return self._insert_plan(tenant_id, plan, actor)

    def get_plan(self, tenant_id: str, code: str, version: int | None = None) -> PlanVersion:
        """Version ``version`` of plan ``code`` (the latest when None); 404 if missing."""
        found = self.rows.plans(tenant_id, code=code, version=version, latest=version is None)
        if not found:
            what = f"plan {code!r}" + (f" version {version}" if version is not None else "")
            raise NotFound(f"{what} not found", field="version" if version else "code")
        return found[-1]

    def list_versions(self, tenant_id: str, code: str) -> list[PlanVersion]:
        found = self.rows.plans(tenant_id, code=code)
        if not found:
            raise NotFound(f"plan {code!r} not found", field="code")
        return found

    def list_plans(self, tenant_id: str) -> list[PlanVersion]:
        """The latest version of every plan, by code."""
        latest: dict[str, PlanVersion] = {}
        for plan in self.rows.plans(tenant_id):
            latest[plan.code] = plan
        return list(latest.values())

    def plan_versions(
        self, tenant_id: str, keys: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], PlanVersion]:
        wanted = set(keys)
        codes = sorted({code for code, _ in wanted})
        if not codes:
            return {}
        plans = self.rows.plans(tenant_id, codes=codes)
        found = {(p.code, p.version): p for p in plans if (p.code, p.version) in wanted}
        missing = wanted - set(found)
        if missing:
            code, version = sorted(missing)[0]
            raise NotFound(f"plan {code!r} version {version} not found", field="plan_code")
        return found

    # --- customers ----------------------------------------------------------------------------

    def create_customer(
        self, tenant_id: str, data: CustomerIn, now: datetime | None = None
    ) -> Customer:
        with self._lock:
            if self.rows.customers(tenant_id, data.external_id):
                raise Conflict(
                    f"customer {data.external_id!r} already exists",
                    field="external_id",
                )
            at = _now(now)
            customer = Customer(**data.model_dump(), created_at=at, updated_at=at)
            self.rows.write_customer(tenant_id, customer)
            return customer

    def get_customer(self, tenant_id: str, external_id: str) -> Customer:
        found = self.rows.customers(tenant_id, external_id)
        if not found:
            raise NotFound(f"customer {external_id!r} not found", field="customer_id")
        return found[0]

    def list_customers(self, tenant_id: str, limit: int = 100, offset: int = 0) -> list[Customer]:
        return self.rows.customers(tenant_id, limit=limit, offset=offset)

    def update_customer(
        self,
        tenant_id: str,
        external_id: str,
        patch: CustomerPatch,
        now: datetime | None = None,
    ) -> Customer:
        """Apply the fields set in ``patch``. The currency cannot change while the customer has a
        subscription (its invoices are in that currency). Live subscriptions keep the time zone
        they pinned at creation; invoices keep the tax rates they were created with."""
        with self._lock:
            current = self.get_customer(tenant_id, external_id)
            changes = patch.model_dump(exclude_unset=True)
            if "currency" in changes and changes["currency"] is None:
                raise ValidationError("currency must not be null", field="currency")
            for field in ("name", "timezone", "tax_rates", "metadata", "tax_inclusive"):
                if field in changes and changes[field] is None:
                    raise ValidationError(f"{field} must not be null", field=field)
            new_currency = changes.get("currency")
            if new_currency is not None and new_currency != current.currency:
                subs = self.list_subscriptions(tenant_id, external_id)
                if subs:
                    raise Conflict(
                        f"customer {external_id!r} has subscriptions billed in "
                        f"{current.currency}; its currency cannot change",
                        field="currency",
                    )
            at = _now(now)
            updated = current.model_copy(
                update={**changes, "updated_at": at, "revision": current.revision + 1}
            )
            updated = Customer.model_validate(updated.model_dump())
            self.rows.write_customer(tenant_id, updated)
            return updated

    # --- subscriptions ------------------------------------------------------------------------

    def get_subscription(self, tenant_id: str, sub_id: str) -> Subscription:
        found = self.rows.subscriptions(tenant_id, sub_id=sub_id)
        if not found:
            raise NotFound(f"subscription {sub_id!r} not found", field="id")
        return found[0]

    def list_subscriptions(
        self, tenant_id: str, customer_id: str | None = None
    ) -> list[Subscription]:
        return self.rows.subscriptions(tenant_id, customer_id=customer_id)

    def _save(
        self,
        tenant_id: str,
        before: Subscription,
        after: Subscription,
        action: str = "updated",
        actor: str = "api",
    ) -> Subscription:
        """Write ``after`` if the stored revision is still ``before``'s (409 otherwise)."""
        stored = self.get_subscription(tenant_id, before.id)
        if stored.revision != before.revision:
            raise Conflict(
                f"subscription {before.id} was changed concurrently; retry",
                field="id",
            )
        if after == before:
            return after
        after = after.model_copy(update={"revision": before.revision + 1})
        self.rows.write_subscription(tenant_id, after)
        new = after.history[len(before.history) :]
        record(
            self.rows,
            tenant_id,
            "subscription",
            after.id,
            action,
            actor,
            {
                "status": after.status.value,
                "plan": f"{after.plan_code} v{after.plan_version}",
                "transitions": [t.model_dump(mode="json") for t in new],
                "pending_change": after.pending_change.model_dump(mode="json")
                if after.pending_change
                else None,
                "cancel_at": after.cancel_at.isoformat() if after.cancel_at else None,
            },
        )
        return after

    def create_subscription(
        self,
        tenant_id: str,
        req: SubscriptionIn,
        now: datetime | None = None,
        actor: str = "api",
    ) -> Subscription:
        """Subscribe a customer to a plan version (latest by default). A customer has at most one
        subscription that is not canceled (409 otherwise)."""
        at = _now(now)
        with self._lock:
            customer = self.get_customer(tenant_id, req.customer_id)
            try:
                plan = self.get_plan(tenant_id, req.plan_code, req.plan_version)
            except NotFound as exc:
                field = "plan_version" if req.plan_version is not None else "plan_code"
                raise NotFound(exc.message, field=field) from None
            for other in self.list_subscriptions(tenant_id, req.customer_id):
                if advance(other, at).status is not SubscriptionStatus.CANCELED:
                    raise Conflict(
                        f"customer {req.customer_id!r} already has subscription {other.id} "
                        f"({other.status.value}); change its plan or cancel it first",
                        details=[detail("customer_id", f"already has subscription {other.id}")],
                    )
            sub = new_subscription("sub_" + uuid.uuid4().hex, req, customer, plan, at)
            self.rows.write_subscription(tenant_id, sub)
            record(
                self.rows,
                tenant_id,
                "subscription",
                sub.id,
                "created",
                actor,
                {
                    "customer_id": sub.customer_id,
                    "plan": f"{sub.plan_code} v{sub.plan_version}",
                    "status": sub.status.value,
                    "start_at": sub.start_at.isoformat(),
                },
            )
            return sub

    def current_subscription(
        self, tenant_id: str, sub_id: str, now: datetime | None = None
    ) -> Subscription:
        """The subscription with its scheduled transitions applied up to ``now`` (persisted)."""
        at = _now(now)
        with self._lock:
            stored = self.get_subscription(tenant_id, sub_id)
            return self._save(tenant_id, stored, advance(stored, at), "scheduled", "system")

    def subscription_action(
        self,
        tenant_id: str,
        sub_id: str,
        req: ActionIn,
        now: datetime | None = None,
        actor: str = "api",
    ) -> Subscription:
        at = _now(now)
        with self._lock:
            stored = self.get_subscription(tenant_id, sub_id)
            updated = apply_action(stored, req.action, at, req.at)
            return self._save(tenant_id, stored, updated, req.action.value, actor)

    def change_subscription_plan(
        self,
        tenant_id: str,
        sub_id: str,
        req: ChangePlanIn,
        now: datetime | None = None,
        actor: str = "api",
    ) -> Subscription:
        at = _now(now)
        with self._lock:
            stored = self.get_subscription(tenant_id, sub_id)
            current = advance(stored, at)
            old = self.get_plan(tenant_id, current.plan_code, current.plan_version)
            try:
                new = self.get_plan(tenant_id, req.plan_code, req.version)
            except NotFound as exc:
                field = "version" if req.version is not None else "plan_code"
                raise NotFound(exc.message, field=field) from None
            updated = change_plan(current, old, new, at, req.timing)
            return self._save(tenant_id, stored, updated, "change_plan", actor)

    # --- the upcoming invoice -----------------------------------------------------------------

    def invoice_subscription(self, tenant_id: str, customer_id: str, now: datetime) -> Subscription:
        """The subscription an upcoming invoice is for: the customer's one that is not canceled,
        else the most recently canceled one (its last period)."""
        subs = [advance(s, now) for s in self.list_subscriptions(tenant_id, customer_id)]
        if not subs:
            raise NotFound(f"customer {customer_id!r} has no subscription", field="customer_id")
        live = [s for s in subs if s.status is not SubscriptionStatus.CANCELED]
        if live:
            return live[-1]
        return max(subs, key=lambda s: (s.canceled_at or s.updated_at, s.created_at))

    def upcoming_invoice(
        self, tenant_id: str, customer_id: str, now: datetime | None = None
    ) -> UpcomingInvoice:
        """The customer's current-period invoice so far, from live usage (without the late-usage
        adjustments, which ``billing.invoices.Invoicing.upcoming_invoice`` adds)."""
        at = _now(now)
        customer = self.get_customer(tenant_id, customer_id)
        sub = self.invoice_subscription(tenant_id, customer_id, at)
        period = current_period(sub, at)
        plans = self.plan_versions(tenant_id, {(t.plan_code, t.plan_version) for t in sub.history})
        keys = usage_keys(sub, plans, period)
        usage = fetch_usage(
            self.rows, tenant_id, {customer_id: keys}, counted_meters(plans.values())
        )[customer_id]
        return assemble_upcoming_invoice(sub, customer, plans, usage, at, period)

    # --- preview ------------------------------------------------------------------------------

    def preview(self, tenant_id: str, req: PreviewIn) -> PreviewOut:
        """Rate a price or a plan against given quantities; nothing is stored."""
        if req.price is not None:
            try:
                price = parse_price(req.price)
            except Exception as exc:
                if hasattr(exc, "errors"):
                    raise _invalid(exc, "price") from None
                raise
            quantity = req.quantity
            if quantity is None:
                if len(req.usage) > 1:
                    raise ValidationError(
                        "a price is rated against one quantity: give quantity or one usage entry",
                        field="usage",
                    )
                given = next(iter(req.usage.values()), Decimal(0))
                if not isinstance(given, Decimal):
                    raise ValidationError(
                        "a price is rated against one number, not per group",
                        field="usage",
                    )
                quantity = given
            currency = req.currency or price.currency
            if currency is None:
                raise ValidationError("give currency (or set it on the price)", field="currency")
            lines = rate_charge_lines(price, quantity, currency)
            currency = lines[0].currency
        else:
            if req.plan is not None:
                plan: PlanSpec = req.plan
            else:
                assert req.plan_code is not None
                try:
                    plan = self.get_plan(tenant_id, req.plan_code, req.plan_version)
                except NotFound as exc:
                    field = "plan_version" if req.plan_version is not None else "plan_code"
                    raise NotFound(exc.message, field=field) from None
            if req.currency is not None and req.currency != plan.currency:
                raise ValidationError(
                    f"currency {req.currency} does not match the plan's {plan.currency}",
                    field="currency",
                )
            currency = plan.currency
            lines = preview_plan_lines(plan, req.usage)
        subtotal, taxes, tax, total = totals(lines, req.tax_rates, currency)
        return PreviewOut(
            currency=currency, lines=lines, subtotal=subtotal, taxes=taxes, tax=tax, total=total
        )
