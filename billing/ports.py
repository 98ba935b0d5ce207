"""The storage interface billing needs (implemented by ``clickhouse.billing.ClickHouseBilling``).

Billing owns this interface: the adapter provides rows and usage numbers; every rule (state
machines, numbering, what an invoice contains) stays in billing and rating.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

from billing.lease import LeaseRows
from clickhouse.usage import UsageValue
from schemas.billing import (
    AuditRecord,
    Correction,
    CreditNote,
    Delivery,
    DeliveryAttempt,
    Discount,
    Invoice,
    Threshold,
    WebhookEndpoint,
)
from schemas.catalog import Customer, PlanVersion, Subscription
from schemas.corrections import Effect, LedgerEvent, Markers, Override
from schemas.meters import Meter
from schemas.tenants import Tenant
from schemas.usage import UsageQuery

Window = tuple[str, datetime]  # (customer, minute window start)
# (tenant, meter, windows) -> recompute the corrected windows (clickhouse.usage.Repair)
WindowRepair = Callable[[str, Meter, list[Window]], None]


class CatalogRows(Protocol):
    def plans(
        self,
        tenant_id: str,
        code: str | None = None,
        version: int | None = None,
        codes: Iterable[str] | None = None,
        latest: bool = False,
    ) -> list[PlanVersion]: ...

    def insert_plan(self, tenant_id: str, plan: PlanVersion) -> None: ...

    def customers(
        self,
        tenant_id: str,
        external_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        external_ids: Iterable[str] | None = None,
    ) -> list[Customer]: ...

    def write_customer(self, tenant_id: str, c: Customer) -> None: ...

    def subscriptions(
        self, tenant_id: str, sub_id: str | None = None, customer_id: str | None = None
    ) -> list[Subscription]: ...

    def write_subscription(self, tenant_id: str, sub: Subscription) -> None: ...

    def get_meter(self, tenant_id: str, slug: str) -> Meter: ...

    def list_meters(self, tenant_id: str) -> list[Meter]: ...

    def get_tenant(self, tenant_id: str) -> Tenant: ...

    def list_tenants(self) -> list[Tenant]: ...


class UsageSource(Protocol):
    def usage(self, q: UsageQuery) -> list[UsageValue]: ...

    def set_window_repair(self, repair: WindowRepair | None) -> None: ...

    def event_counts(
        self,
        tenant_id: str,
        meter: Meter,
        start: datetime,
        end: datetime,
        customers: Sequence[str] | None,
        group_by: str | None,
    ) -> dict[tuple[str, str], int]: ...


class InvoiceRows(Protocol):
    def invoice_keys(self, tenant_id: str) -> list[tuple[str, str, datetime, int, str]]: ...

    def invoices(
        self,
        tenant_id: str,
        ids: Iterable[str] | None = None,
        customer_id: str | None = None,
        status: str | None = None,
        subscription_ids: Iterable[str] | None = None,
        period_from: datetime | None = None,
        period_to: datetime | None = None,
    ) -> list[Invoice]: ...

    def write_invoices(
        self, tenant_id: str, invoices: Sequence[Invoice], *, create: bool = False
    ) -> None: ...

    def invoice_run_ids(self, tenant_id: str, ids: Iterable[str]) -> dict[str, str]: ...

    def invoice_heads(
        self, tenant_id: str, since: datetime
    ) -> list[tuple[str, str, str, datetime, datetime | None, datetime | None]]: ...

    def credit_note_heads(self, tenant_id: str, since: datetime) -> list[tuple[str, datetime]]: ...

    def number_state(
        self, tenant_id: str, kind: str, document_ids: Sequence[str]
    ) -> tuple[int, dict[str, int]]: ...

    def claim_numbers(
        self, tenant_id: str, kind: str, first: int, docs: Sequence[tuple[str, str]]
    ) -> dict[int, str]: ...

    def claims(
        self, tenant_id: str, kind: str, document_ids: Iterable[str] | None = None
    ) -> dict[str, tuple[int, str]]: ...

    def credit_notes(
        self,
        tenant_id: str,
        invoice_ids: Iterable[str] | None = None,
        ids: Iterable[str] | None = None,
        customer_id: str | None = None,
    ) -> list[CreditNote]: ...

    def write_credit_note(self, tenant_id: str, note: CreditNote) -> None: ...

    def discounts(
        self, tenant_id: str, customer_ids: Iterable[str] | None = None
    ) -> list[Discount]: ...

    def write_discount(self, tenant_id: str, d: Discount) -> None: ...

    def append_audit(self, tenant_id: str, records: Sequence[AuditRecord]) -> None: ...

    def audit(
        self, tenant_id: str, object_type: str | None = None, object_id: str | None = None
    ) -> list[AuditRecord]: ...


class CorrectionRows(Protocol):
    def get_event(self, tenant_id: str, event_id: str) -> LedgerEvent: ...

    def ledger_window_events(
        self, tenant_id: str, event_type: str, windows: Sequence[Window]
    ) -> list[LedgerEvent]: ...

    def activation_markers(
        self, tenant_id: str, meter_ids: Sequence[str]
    ) -> dict[str, Markers]: ...

    def correction_top(self, tenant_id: str) -> int: ...

    def corrections(self, tenant_id: str, event_id: str | None = None) -> list[Correction]: ...

    def claim_correction(
        self, tenant_id: str, correction: Correction, effects: Sequence[Effect]
    ) -> str | None: ...

    def latest_corrections(
        self, tenant_id: str, event_ids: Sequence[str]
    ) -> dict[str, dict[str, Any] | None]: ...

    def dirty_keys(
        self, tenant_id: str, meter_id: str, windows: Sequence[Window]
    ) -> dict[Window, dict[tuple[str, str], dict[str, str]]]: ...

    def stream_counts(
        self, tenant_id: str, meter_id: str, windows: Sequence[Window]
    ) -> dict[tuple[str, datetime, str], int]: ...

    def write_overrides(self, tenant_id: str, overrides: Sequence[Override]) -> None: ...


class WebhookRows(Protocol):
    def endpoints(self, tenant_id: str) -> list[tuple[WebhookEndpoint, int]]: ...

    def write_endpoint(self, tenant_id: str, ep: WebhookEndpoint, secret_version: int) -> None: ...

    def deliveries(
        self,
        tenant_id: str,
        endpoint_id: str | None = None,
        event_ids: Iterable[str] | None = None,
        ids: Iterable[str] | None = None,
        limit: int = 1000,
    ) -> list[Delivery]: ...

    def write_deliveries(
        self, tenant_id: str, deliveries: Sequence[Delivery], *, create: bool = False
    ) -> None: ...

    def due_deliveries(self, now: datetime, limit: int = 100) -> list[tuple[str, Delivery]]: ...

    def append_attempt(self, tenant_id: str, delivery_id: str, a: DeliveryAttempt) -> None: ...

    def attempts(self, tenant_id: str, delivery_id: str) -> list[DeliveryAttempt]: ...

    def thresholds(self, tenant_id: str, customer_id: str | None = None) -> list[Threshold]: ...

    def write_threshold(self, tenant_id: str, t: Threshold) -> None: ...

    def threshold_tenants(self) -> list[str]: ...

    def endpoint_tenants(self) -> list[str]: ...


class BillingStore(
    CatalogRows, UsageSource, InvoiceRows, CorrectionRows, WebhookRows, LeaseRows, Protocol
):
    """Everything billing reads and writes."""


def open_billing_store(store: Any, repo: Any = None) -> BillingStore:
    """The ClickHouse adapter on ``store`` (a ``clickhouse.store.Store``)."""
    from clickhouse.billing import ClickHouseBilling

    return ClickHouseBilling(store, repo)
