"""Catalog storage (plans, customers, subscriptions) and the catalog operations that combine it
with the pure logic (rating.subscriptions, rating.invoice) and live usage (clickhouse.usage).

Every method takes the tenant id and filters on it. Reads use ``FINAL``. Read-modify-write
operations run under one lock per ``Catalog`` instance (keep one per process, e.g. per app);
across processes, plan versions are first-writer-wins (see 010_catalog.sql) and subscription
updates check the revision they started from (409 on a concurrent change).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from clickhouse.store import Store
from rating.invoice import (
    UsageAmount,
    UsageKey,
    assemble_upcoming_invoice,
    preview_plan_lines,
    totals,
    usage_keys,
)
from rating.lines import rate_charge_lines
from rating.subscriptions import advance, apply_action, change_plan, new_subscription
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
from schemas.pricing import PercentagePrice, PlanSpec, parse_price
from schemas.timeutil import to_ms, utc_now
from tally.errors import (
    Conflict,
    NotFound,
    ValidationError,
    detail,
    pydantic_details,
    summarize,
)

log = logging.getLogger(__name__)

_RANK_BASE = 1 << 63


def _micros(dt: datetime) -> int:
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _now(now: datetime | None) -> datetime:
    return to_ms(now) if now is not None else utc_now()


class Catalog:
    """Plans, customers and subscriptions of every tenant in one store."""

    def __init__(self, store: Store, meters: Any = None) -> None:
        """``meters`` has ``get_meter(tenant_id, slug) -> Meter`` (raising NotFound);
        defaults to ``clickhouse.repo.Repo(store)``."""
        if meters is None:
            from clickhouse.repo import Repo

            meters = Repo(store)
        self.store = store
        self.db = store.database
        self.meters = meters
        self._lock = threading.RLock()
        self._last_version = 0

    def _version(self) -> int:
        """Row versions: strictly increasing in this process, from the wall clock (not the
        logical ``now`` of an operation), so the latest write always wins."""
        with self._lock:
            self._last_version = max(_micros(datetime.now(UTC)), self._last_version + 1)
            return self._last_version

    # --- plans --------------------------------------------------------------------------------

    def _check_meters(self, tenant_id: str, spec: PlanSpec) -> None:
        """Every metered charge names an existing meter, and its group_by is a dimension of it."""
        problems = []
        for i, charge in enumerate(spec.charges):
            if charge.meter_slug is None:
                continue
            try:
                meter = self.meters.get_meter(tenant_id, charge.meter_slug)
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
            raise ValidationError(summarize(problems), details=problems)

    def _plan_rows(self, where: str, params: dict[str, Any]) -> list[PlanVersion]:
        rows = self.store.query_rows(
            f"SELECT doc FROM {self.db}.plans FINAL WHERE tenant_id = {{tenant:String}} "
            f"AND {where} ORDER BY code, version",
            params,
        )
        return [PlanVersion.model_validate_json(r[0]) for r in rows]

    def _insert_plan(self, tenant_id: str, plan: PlanVersion) -> PlanVersion:
        rank = _RANK_BASE - _micros(datetime.now(UTC))
        self.store.insert(
            "plans",
            [
                (
                    tenant_id,
                    plan.code,
                    plan.version,
                    plan.name,
                    plan.currency,
                    plan.model_dump_json(),
                    plan.created_at,
                    rank,
                )
            ],
            ["tenant_id", "code", "version", "name", "currency", "doc", "created_at", "rank"],
        )
        # First writer wins: if another process published this version first, say so.
        stored = self.get_plan(tenant_id, plan.code, plan.version)
        if stored != plan:
            raise Conflict(
                f"plan {plan.code} v{plan.version} was published concurrently; retry",
                field="code",
            )
        return plan

    def create_plan(
        self, tenant_id: str, spec: PlanSpec, now: datetime | None = None
    ) -> PlanVersion:
        """Create plan ``spec.code`` as version 1 (409 if the code exists)."""
        with self._lock:
            if self._plan_rows("code = {code:String}", {"tenant": tenant_id, "code": spec.code}):
                raise Conflict(
                    f"plan {spec.code!r} already exists; publish a new version with "
                    f"POST /v1/plans/{spec.code}/versions",
                    field="code",
                )
            self._check_meters(tenant_id, spec)
            plan = PlanVersion(**spec.model_dump(), version=1, created_at=_now(now))
            return self._insert_plan(tenant_id, plan)

    def publish_version(
        self, tenant_id: str, code: str, draft: PlanDraft, now: datetime | None = None
    ) -> PlanVersion:
        """Publish the next version of ``code``; omitted fields are copied from the latest."""
        with self._lock:
            latest = self.get_plan(tenant_id, code)
            data = latest.spec().model_dump()
            data.update(draft.model_dump(exclude_none=True))
            try:
                spec = PlanSpec.model_validate(data)
            except Exception as exc:  # pydantic: a cross-field rule of the merged plan
                if hasattr(exc, "errors"):
                    details = pydantic_details(exc)
                    raise ValidationError(summarize(details), details=details) from None
                raise
            self._check_meters(tenant_id, spec)
            plan = PlanVersion(
                **spec.model_dump(), version=latest.version + 1, created_at=_now(now)
            )
            return self._insert_plan(tenant_id, plan)

    def get_plan(self, tenant_id: str, code: str, version: int | None = None) -> PlanVersion:
        """Version ``version`` of plan ``code`` (the latest when None); 404 if missing."""
        params: dict[str, Any] = {"tenant": tenant_id, "code": code}
        where = "code = {code:String}"
        if version is not None:
            where += " AND version = {version:UInt32}"
            params["version"] = version
        found = self._plan_rows(where, params)
        if not found:
            what = f"plan {code!r}" + (f" version {version}" if version is not None else "")
            raise NotFound(f"{what} not found", field="version" if version else "code")
        return found[-1]

    def list_versions(self, tenant_id: str, code: str) -> list[PlanVersion]:
        found = self._plan_rows("code = {code:String}", {"tenant": tenant_id, "code": code})
        if not found:
            raise NotFound(f"plan {code!r} not found", field="code")
        return found

    def list_plans(self, tenant_id: str) -> list[PlanVersion]:
        """The latest version of every plan, by code."""
        latest: dict[str, PlanVersion] = {}
        for plan in self._plan_rows("1", {"tenant": tenant_id}):
            latest[plan.code] = plan
        return list(latest.values())

    def plan_versions(
        self, tenant_id: str, keys: Iterable[tuple[str, int]]
    ) -> dict[tuple[str, int], PlanVersion]:
        wanted = set(keys)
        codes = sorted({code for code, _ in wanted})
        if not codes:
            return {}
        plans = self._plan_rows(
            "code IN {codes:Array(String)}", {"tenant": tenant_id, "codes": codes}
        )
        found = {(p.code, p.version): p for p in plans if (p.code, p.version) in wanted}
        missing = wanted - set(found)
        if missing:
            code, version = sorted(missing)[0]
            raise NotFound(f"plan {code!r} version {version} not found", field="plan_code")
        return found

    # --- customers ----------------------------------------------------------------------------

    def _customer_rows(self, where: str, params: dict[str, Any], tail: str = "") -> list[Customer]:
        rows = self.store.query_rows(
            f"SELECT doc FROM {self.db}.customers FINAL WHERE tenant_id = {{tenant:String}} "
            f"AND {where} ORDER BY external_id {tail}",
            params,
        )
        return [Customer.model_validate_json(r[0]) for r in rows]

    def _write_customer(self, tenant_id: str, c: Customer) -> None:
        self.store.insert(
            "customers",
            [
                (
                    tenant_id,
                    c.external_id,
                    c.name,
                    c.currency,
                    c.model_dump_json(),
                    c.created_at,
                    c.updated_at,
                    self._version(),
                )
            ],
            [
                "tenant_id",
                "external_id",
                "name",
                "currency",
                "doc",
                "created_at",
                "updated_at",
                "version",
            ],
        )

    def create_customer(
        self, tenant_id: str, data: CustomerIn, now: datetime | None = None
    ) -> Customer:
        with self._lock:
            if self._customer_rows(
                "external_id = {ext:String}", {"tenant": tenant_id, "ext": data.external_id}
            ):
                raise Conflict(
                    f"customer {data.external_id!r} already exists",
                    field="external_id",
                )
            at = _now(now)
            customer = Customer(**data.model_dump(), created_at=at, updated_at=at)
            self._write_customer(tenant_id, customer)
            return customer

    def get_customer(self, tenant_id: str, external_id: str) -> Customer:
        found = self._customer_rows(
            "external_id = {ext:String}", {"tenant": tenant_id, "ext": external_id}
        )
        if not found:
            raise NotFound(f"customer {external_id!r} not found", field="customer_id")
        return found[0]

    def list_customers(self, tenant_id: str, limit: int = 100, offset: int = 0) -> list[Customer]:
        return self._customer_rows(
            "1",
            {"tenant": tenant_id, "limit": limit, "offset": offset},
            "LIMIT {limit:UInt32} OFFSET {offset:UInt32}",
        )

    def update_customer(
        self,
        tenant_id: str,
        external_id: str,
        patch: CustomerPatch,
        now: datetime | None = None,
    ) -> Customer:
        """Apply the fields set in ``patch``. The currency cannot change while the customer has a
        subscription (its invoices are in that currency). Live subscriptions keep the time zone
        they pinned at creation."""
        with self._lock:
            current = self.get_customer(tenant_id, external_id)
            changes = patch.model_dump(exclude_unset=True)
            if "currency" in changes and changes["currency"] is None:
                raise ValidationError("currency must not be null", field="currency")
            for field in ("name", "timezone", "tax_rates", "metadata"):
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
            self._write_customer(tenant_id, updated)
            return updated

    # --- subscriptions ------------------------------------------------------------------------

    def _sub_rows(self, where: str, params: dict[str, Any]) -> list[Subscription]:
        rows = self.store.query_rows(
            f"SELECT doc FROM {self.db}.subscriptions FINAL WHERE tenant_id = {{tenant:String}} "
            f"AND {where} ORDER BY created_at, subscription_id",
            params,
        )
        return [Subscription.model_validate_json(r[0]) for r in rows]

    def _write_subscription(self, tenant_id: str, sub: Subscription) -> None:
        self.store.insert(
            "subscriptions",
            [
                (
                    tenant_id,
                    sub.id,
                    sub.customer_id,
                    sub.status.value,
                    sub.plan_code,
                    sub.plan_version,
                    sub.model_dump_json(),
                    sub.created_at,
                    sub.updated_at,
                    self._version(),
                )
            ],
            [
                "tenant_id",
                "subscription_id",
                "customer_id",
                "status",
                "plan_code",
                "plan_version",
                "doc",
                "created_at",
                "updated_at",
                "version",
            ],
        )

    def get_subscription(self, tenant_id: str, sub_id: str) -> Subscription:
        found = self._sub_rows("subscription_id = {id:String}", {"tenant": tenant_id, "id": sub_id})
        if not found:
            raise NotFound(f"subscription {sub_id!r} not found", field="id")
        return found[0]

    def list_subscriptions(
        self, tenant_id: str, customer_id: str | None = None
    ) -> list[Subscription]:
        if customer_id is None:
            return self._sub_rows("1", {"tenant": tenant_id})
        return self._sub_rows(
            "customer_id = {cust:String}", {"tenant": tenant_id, "cust": customer_id}
        )

    def _save(self, tenant_id: str, before: Subscription, after: Subscription) -> Subscription:
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
        self._write_subscription(tenant_id, after)
        return after

    def create_subscription(
        self, tenant_id: str, req: SubscriptionIn, now: datetime | None = None
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
            self._write_subscription(tenant_id, sub)
            return sub

    def current_subscription(
        self, tenant_id: str, sub_id: str, now: datetime | None = None
    ) -> Subscription:
        """The subscription with its scheduled transitions applied up to ``now`` (persisted)."""
        at = _now(now)
        with self._lock:
            stored = self.get_subscription(tenant_id, sub_id)
            return self._save(tenant_id, stored, advance(stored, at))

    def subscription_action(
        self, tenant_id: str, sub_id: str, req: ActionIn, now: datetime | None = None
    ) -> Subscription:
        at = _now(now)
        with self._lock:
            stored = self.get_subscription(tenant_id, sub_id)
            updated = apply_action(stored, req.action, at, req.at)
            return self._save(tenant_id, stored, updated)

    def change_subscription_plan(
        self, tenant_id: str, sub_id: str, req: ChangePlanIn, now: datetime | None = None
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
            return self._save(tenant_id, stored, updated)

    # --- invoices -----------------------------------------------------------------------------

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

    def fetch_usage(
        self,
        tenant_id: str,
        customer_id: str,
        keys: Iterable[UsageKey],
        plans: Iterable[PlanVersion],
    ) -> dict[UsageKey, list[UsageAmount]]:
        """Read every usage number from the live minute pre-aggregates (``run_usage``)."""
        from clickhouse.usage import run_usage
        from schemas.usage import UsageQuery

        counted = {
            c.meter_slug
            for p in plans
            for c in p.usage_charges
            if isinstance(c.price, PercentagePrice) and c.price.fixed_amount
        }
        meters: dict[str, Any] = {}
        out: dict[UsageKey, list[UsageAmount]] = {}
        for key in keys:
            if key.meter_slug not in meters:
                try:
                    meters[key.meter_slug] = self.meters.get_meter(tenant_id, key.meter_slug)
                except NotFound:
                    log.warning(
                        "tenant %s: meter %r of a plan no longer exists; its usage counts 0",
                        tenant_id,
                        key.meter_slug,
                    )
                    meters[key.meter_slug] = None
            meter = meters[key.meter_slug]
            if meter is None:
                out[key] = []
                continue
            q = UsageQuery(
                tenant_id=tenant_id,
                meter=meter,
                from_=key.start,
                to=key.end,
                window=None,
                tz="UTC",
                customers=[customer_id],
                group_by=[key.group_by] if key.group_by else [],
                filters={},
                by_customer=False,
            )
            rows = run_usage(self.store, q)
            counts = (
                self._event_counts(tenant_id, meter.id, customer_id, key)
                if key.meter_slug in counted
                else {}
            )
            amounts = []
            for row in rows:
                group = dict(row.group_by or {}) if key.group_by else None
                value = row.value if row.value is not None else Decimal(0)
                gval = (group or {}).get(key.group_by or "", "")
                amounts.append(
                    UsageAmount(Decimal(value), group, counts.get(gval) if counted else None)
                )
            if key.meter_slug in counted and not amounts:
                amounts.append(UsageAmount(Decimal(0), None, 0))
            out[key] = amounts
        return out

    def _event_counts(
        self, tenant_id: str, meter_id: str, customer_id: str, key: UsageKey
    ) -> dict[str, int]:
        """Matched events per group value (for a percentage price's per-event fixed fee)."""
        group_expr = "group_values[{dim:String}]" if key.group_by else "''"
        rows = self.store.query_rows(
            f"SELECT {group_expr} AS g, sum(events) FROM {self.db}.usage_minute "
            "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} "
            "AND customer = {cust:String} AND window_start >= {start:DateTime64(3, 'UTC')} "
            "AND window_start < {end:DateTime64(3, 'UTC')} GROUP BY g",
            {
                "tenant": tenant_id,
                "meter": meter_id,
                "cust": customer_id,
                "start": key.start,
                "end": key.end,
                "dim": key.group_by or "",
            },
        )
        return {str(g): int(n) for g, n in rows}

    def upcoming_invoice(
        self, tenant_id: str, customer_id: str, now: datetime | None = None
    ) -> UpcomingInvoice:
        """The customer's current-period invoice so far, from live usage."""
        at = _now(now)
        customer = self.get_customer(tenant_id, customer_id)
        sub = self.invoice_subscription(tenant_id, customer_id, at)
        from rating.subscriptions import current_period

        period = current_period(sub, at)
        plans = self.plan_versions(tenant_id, {(t.plan_code, t.plan_version) for t in sub.history})
        keys = usage_keys(sub, plans, period)
        usage = self.fetch_usage(tenant_id, customer_id, keys, plans.values())
        return assemble_upcoming_invoice(sub, customer, plans, usage, at, period)

    # --- preview ------------------------------------------------------------------------------

    def preview(self, tenant_id: str, req: PreviewIn) -> PreviewOut:
        """Rate a price or a plan against given quantities; nothing is stored."""
        if req.price is not None:
            try:
                price = parse_price(req.price)
            except Exception as exc:
                if hasattr(exc, "errors"):
                    details = pydantic_details(exc, "price")
                    raise ValidationError(summarize(details), details=details) from None
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
