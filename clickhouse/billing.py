"""Billing rows (050_billing.sql): invoices, number claims, credit notes, discounts, audit trail,
event corrections, webhooks and thresholds, plus the usage reads billing needs. SQL and rows
only: ``ClickHouseBilling`` implements the storage protocols of ``billing.ports``.

Every method takes the tenant id first and filters on it, except the two scheduling reads of the
background tasks (``due_deliveries``, ``threshold_tenants``), which list work across tenants.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from clickhouse.catalog import CatalogStore, RowVersions, first_writer_rank
from clickhouse.corrections import CorrectionStore
from clickhouse.queries import usage_source
from clickhouse.repo import Repo
from clickhouse.store import Store
from clickhouse.usage import Repair, UsageValue, usage_values
from schemas.billing import (
    AuditRecord,
    CreditNote,
    Delivery,
    DeliveryAttempt,
    Discount,
    Invoice,
    Threshold,
    WebhookEndpoint,
)
from schemas.leases import LeaseRow
from schemas.meters import Meter
from schemas.tenants import Tenant
from schemas.timeutil import from_epoch_ms
from schemas.usage import UsageQuery

DEDUP = {"insert_deduplicate": 1}

INVOICE_COLUMNS = [
    "tenant_id",
    "invoice_id",
    "subscription_id",
    "customer_id",
    "period_start",
    "period_end",
    "revision",
    "status",
    "number",
    "doc",
    "created_at",
    "updated_at",
    "version",
]


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _iso(text: str) -> datetime | None:
    return _utc(datetime.fromisoformat(text)) if text else None


def token_of(*parts: str) -> str:
    """A deduplication token for an insert (stable for the same logical write)."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


class ClickHouseBilling(CorrectionStore, CatalogStore):
    """The ClickHouse adapter behind ``billing`` (catalog rows come from ``CatalogStore``,
    correction rows from ``CorrectionStore``)."""

    def __init__(self, store: Store, repo: Repo | None = None) -> None:
        super().__init__(store, RowVersions())
        self.repo = repo or Repo(store)
        self.window_repair: Repair | None = None

    def set_window_repair(self, repair: Repair | None) -> None:
        """The recomputation of corrected minute windows (``billing.corrections``) that usage
        reads use when an override is out of date (``clickhouse.usage.run_usage``)."""
        self.window_repair = repair

    # --- tenants and meters -------------------------------------------------------------------

    def get_tenant(self, tenant_id: str) -> Tenant:
        return self.repo.get_tenant(tenant_id)

    def list_tenants(self) -> list[Tenant]:
        return self.repo.list_tenants()

    def get_meter(self, tenant_id: str, slug: str) -> Meter:
        return self.repo.get_meter(tenant_id, slug)

    def list_meters(self, tenant_id: str) -> list[Meter]:
        return self.repo.list_meters(tenant_id)

    # --- usage --------------------------------------------------------------------------------

    def usage(self, q: UsageQuery) -> list[UsageValue]:
        return usage_values(self.store, q, self.window_repair)

    def event_counts(
        self,
        tenant_id: str,
        meter: Meter,
        start: datetime,
        end: datetime,
        customers: Sequence[str] | None,
        group_by: str | None,
    ) -> dict[tuple[str, str], int]:
        """Counted events per (customer, group value) in ``[start, end)``, from the same rows as
        usage queries (stream + visible backfill run, corrections applied)."""
        group_expr = "group_values[{dim:String}]" if group_by else "''"
        params: dict[str, Any] = {
            "tenant": tenant_id,
            "meter": meter.id,
            "start": start,
            "end": end,
            "dim": group_by or "",
        }
        cust = ""
        if customers is not None:
            cust = " AND customer IN {custs:Array(String)}"
            params["custs"] = list(customers)
        rows = self.store.query_rows(
            f"SELECT customer, {group_expr} AS g, sum(events) "
            f"FROM {usage_source(self.db, meter.aggregation)} "
            "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} "
            "AND window_start >= {start:DateTime64(3, 'UTC')} "
            f"AND window_start < {{end:DateTime64(3, 'UTC')}}{cust} GROUP BY customer, g",
            params,
        )
        return {(str(c), str(g)): int(n) for c, g, n in rows}

    # --- invoices -----------------------------------------------------------------------------

    def invoice_keys(self, tenant_id: str) -> list[tuple[str, str, datetime, int, str]]:
        """``(invoice_id, subscription_id, period_start, revision, status)`` of every invoice."""
        rows = self.store.query_rows(
            f"SELECT invoice_id, subscription_id, period_start, revision, status "
            f"FROM {self.db}.invoices FINAL WHERE tenant_id = {{tenant:String}}",
            {"tenant": tenant_id},
        )
        return [(r[0], r[1], _utc(r[2]), int(r[3]), str(r[4])) for r in rows]

    def invoices(
        self,
        tenant_id: str,
        ids: Iterable[str] | None = None,
        customer_id: str | None = None,
        status: str | None = None,
        subscription_ids: Iterable[str] | None = None,
        period_from: datetime | None = None,
        period_to: datetime | None = None,
    ) -> list[Invoice]:
        where = ["tenant_id = {tenant:String}"]
        params: dict[str, Any] = {"tenant": tenant_id}
        if ids is not None:
            where.append("invoice_id IN {ids:Array(String)}")
            params["ids"] = sorted(set(ids))
        if customer_id is not None:
            where.append("customer_id = {cust:String}")
            params["cust"] = customer_id
        if subscription_ids is not None:
            where.append("subscription_id IN {subs:Array(String)}")
            params["subs"] = sorted(set(subscription_ids))
        if period_from is not None:
            where.append("period_start >= {pfrom:DateTime64(3, 'UTC')}")
            params["pfrom"] = period_from
        if period_to is not None:
            where.append("period_end <= {pto:DateTime64(3, 'UTC')}")
            params["pto"] = period_to
        outer = ""
        if status is not None:
            outer = " WHERE status = {status:String}"
            params["status"] = status
        rows = self.store.query_rows(
            f"SELECT doc FROM (SELECT doc, status, period_start, customer_id, invoice_id "
            f"FROM {self.db}.invoices FINAL WHERE {' AND '.join(where)}){outer} "
            "ORDER BY period_start, customer_id, invoice_id",
            params,
        )
        return [Invoice.model_validate_json(r[0]) for r in rows]

    def invoice_run_ids(self, tenant_id: str, ids: Iterable[str]) -> dict[str, str]:
        """invoice id -> the run that wrote the surviving row (``run_id`` of its document)."""
        rows = self.store.query_rows(
            f"SELECT invoice_id, JSONExtractString(doc, 'run_id') FROM {self.db}.invoices FINAL "
            "WHERE tenant_id = {tenant:String} AND invoice_id IN {ids:Array(String)}",
            {"tenant": tenant_id, "ids": sorted(set(ids))},
        )
        return {str(i): str(r) for i, r in rows}

    def write_invoices(
        self, tenant_id: str, invoices: Sequence[Invoice], *, create: bool = False
    ) -> None:
        """Insert invoice rows. ``create``: version 1 and a deduplication token over the ids,
        so a retried (or concurrent, identical) creation insert is dropped by the server; a
        later state change (version = now) always wins over a creation row."""
        if not invoices:
            return
        rows = []
        for inv in invoices:
            version = 1 if create else self.versions.next()
            rows.append(
                (
                    tenant_id,
                    inv.id,
                    inv.subscription_id,
                    inv.customer_id,
                    inv.period_start,
                    inv.period_end,
                    inv.revision,
                    inv.status.value,
                    inv.number or "",
                    inv.model_dump_json(),
                    inv.created_at,
                    inv.updated_at,
                    version,
                )
            )
        settings: dict[str, Any] | None = None
        if create:
            token = token_of(tenant_id, "create", *sorted(i.id for i in invoices))
            settings = {**DEDUP, "insert_deduplication_token": token}
        self.store.insert("invoices", rows, INVOICE_COLUMNS, settings=settings)

    def invoice_heads(
        self, tenant_id: str, since: datetime
    ) -> list[tuple[str, str, str, datetime, datetime | None, datetime | None]]:
        """``(invoice_id, status, number, created_at, finalized_at, voided_at)`` of the invoices
        changed since ``since`` (without parsing their documents)."""
        rows = self.store.query_rows(
            f"SELECT invoice_id, status, number, created_at, JSONExtractString(doc, 'finalized_at'), "
            f"JSONExtractString(doc, 'voided_at') FROM {self.db}.invoices FINAL "
            "WHERE tenant_id = {tenant:String} AND updated_at >= {since:DateTime64(3, 'UTC')} "
            "ORDER BY invoice_id",
            {"tenant": tenant_id, "since": since},
        )
        return [(str(i), str(st), str(n), _utc(c), _iso(f), _iso(v)) for i, st, n, c, f, v in rows]

    def credit_note_heads(self, tenant_id: str, since: datetime) -> list[tuple[str, datetime]]:
        rows = self.store.query_rows(
            f"SELECT credit_note_id, created_at FROM {self.db}.credit_notes FINAL "
            "WHERE tenant_id = {tenant:String} AND created_at >= {since:DateTime64(3, 'UTC')} "
            "ORDER BY credit_note_id",
            {"tenant": tenant_id, "since": since},
        )
        return [(str(i), _utc(c)) for i, c in rows]

    # --- number claims ------------------------------------------------------------------------

    def number_state(
        self, tenant_id: str, kind: str, document_ids: Sequence[str]
    ) -> tuple[int, dict[str, int]]:
        """``(highest claimed seq, {document: its seq})`` in ONE read (one snapshot), so that a
        reader who sees a seq also sees every claim at or below it."""
        rows = self.store.query_rows(
            f"SELECT seq, document_id, document_id IN {{docs:Array(String)}} "
            f"FROM {self.db}.document_numbers FINAL "
            "WHERE tenant_id = {tenant:String} AND kind = {kind:String} "
            "AND (document_id IN {docs:Array(String)} OR seq = (SELECT max(seq) FROM "
            f"{self.db}.document_numbers WHERE tenant_id = {{tenant:String}} "
            "AND kind = {kind:String}))",
            {"tenant": tenant_id, "kind": kind, "docs": list(document_ids)},
        )
        top = 0
        mine: dict[str, int] = {}
        for seq, doc_id, is_mine in rows:
            top = max(top, int(seq))
            if is_mine:
                mine[str(doc_id)] = int(seq)
        return top, mine

    def claim_numbers(
        self, tenant_id: str, kind: str, first: int, docs: Sequence[tuple[str, str]]
    ) -> dict[int, str]:
        """Try to claim seqs ``first, first+1, ...`` for ``docs`` (``(document_id, doc)``) in ONE
        insert (one part: all or nothing) whose dedup token is (tenant, kind, first): a second
        block starting at the same seq is dropped by the server. Returns seq -> the document
        that holds it after the attempt (read back: that decides who won)."""
        now = datetime.now(UTC)
        rank = first_writer_rank()
        rows = [
            (tenant_id, kind, first + i, doc_id, doc, now, rank)
            for i, (doc_id, doc) in enumerate(docs)
        ]
        self.store.insert(
            "document_numbers",
            rows,
            ["tenant_id", "kind", "seq", "document_id", "doc", "claimed_at", "rank"],
            settings={
                **DEDUP,
                "insert_deduplication_token": token_of(tenant_id, kind, str(first)),
                "max_insert_block_size": 1 << 40,
                "min_insert_block_size_rows": 1 << 40,
                "min_insert_block_size_bytes": 1 << 50,
            },
        )
        found = self.store.query_rows(
            f"SELECT seq, document_id FROM {self.db}.document_numbers FINAL "
            "WHERE tenant_id = {tenant:String} AND kind = {kind:String} "
            "AND seq >= {lo:UInt64} AND seq < {hi:UInt64}",
            {"tenant": tenant_id, "kind": kind, "lo": first, "hi": first + len(docs)},
        )
        return {int(s): str(d) for s, d in found}

    def claims(
        self, tenant_id: str, kind: str, document_ids: Iterable[str] | None = None
    ) -> dict[str, tuple[int, str]]:
        """document_id -> (seq, doc) of the claims (of the given documents)."""
        params: dict[str, Any] = {"tenant": tenant_id, "kind": kind}
        extra = ""
        if document_ids is not None:
            extra = " AND document_id IN {docs:Array(String)}"
            params["docs"] = sorted(set(document_ids))
        rows = self.store.query_rows(
            f"SELECT document_id, seq, doc FROM {self.db}.document_numbers FINAL "
            f"WHERE tenant_id = {{tenant:String}} AND kind = {{kind:String}}{extra} ORDER BY seq",
            params,
        )
        return {str(d): (int(s), str(doc)) for d, s, doc in rows}

    # --- credit notes -------------------------------------------------------------------------

    def credit_notes(
        self,
        tenant_id: str,
        invoice_ids: Iterable[str] | None = None,
        ids: Iterable[str] | None = None,
        customer_id: str | None = None,
    ) -> list[CreditNote]:
        where = ["tenant_id = {tenant:String}"]
        params: dict[str, Any] = {"tenant": tenant_id}
        if invoice_ids is not None:
            where.append("invoice_id IN {inv:Array(String)}")
            params["inv"] = sorted(set(invoice_ids))
        if ids is not None:
            where.append("credit_note_id IN {ids:Array(String)}")
            params["ids"] = sorted(set(ids))
        if customer_id is not None:
            where.append("customer_id = {cust:String}")
            params["cust"] = customer_id
        rows = self.store.query_rows(
            f"SELECT doc FROM {self.db}.credit_notes FINAL WHERE {' AND '.join(where)} "
            "ORDER BY created_at, credit_note_id",
            params,
        )
        return [CreditNote.model_validate_json(r[0]) for r in rows]

    def write_credit_note(self, tenant_id: str, note: CreditNote) -> None:
        self.store.insert(
            "credit_notes",
            [
                (
                    tenant_id,
                    note.id,
                    note.invoice_id,
                    note.customer_id,
                    note.number,
                    note.model_dump_json(),
                    note.created_at,
                    self.versions.next(),
                )
            ],
            [
                "tenant_id",
                "credit_note_id",
                "invoice_id",
                "customer_id",
                "number",
                "doc",
                "created_at",
                "version",
            ],
        )

    # --- discounts ----------------------------------------------------------------------------

    def discounts(
        self, tenant_id: str, customer_ids: Iterable[str] | None = None
    ) -> list[Discount]:
        params: dict[str, Any] = {"tenant": tenant_id}
        extra = ""
        if customer_ids is not None:
            extra = " AND customer_id IN {custs:Array(String)}"
            params["custs"] = sorted(set(customer_ids))
        rows = self.store.query_rows(
            f"SELECT doc FROM {self.db}.discounts FINAL WHERE tenant_id = {{tenant:String}}"
            f"{extra} ORDER BY customer_id, created_at, discount_id",
            params,
        )
        return [Discount.model_validate_json(r[0]) for r in rows]

    def write_discount(self, tenant_id: str, d: Discount) -> None:
        self.store.insert(
            "discounts",
            [
                (
                    tenant_id,
                    d.customer_id,
                    d.id,
                    d.model_dump_json(),
                    d.created_at,
                    self.versions.next(),
                )
            ],
            ["tenant_id", "customer_id", "discount_id", "doc", "created_at", "version"],
        )

    # --- audit trail --------------------------------------------------------------------------

    def append_audit(self, tenant_id: str, records: Sequence[AuditRecord]) -> None:
        self.store.insert(
            "audit_log",
            [
                (
                    tenant_id,
                    r.object_type,
                    r.object_id,
                    r.at,
                    r.action,
                    r.actor,
                    orjson.dumps(r.data, default=str).decode(),
                )
                for r in records
            ],
            ["tenant_id", "object_type", "object_id", "at", "action", "actor", "data"],
        )

    def audit(
        self, tenant_id: str, object_type: str | None = None, object_id: str | None = None
    ) -> list[AuditRecord]:
        where = ["tenant_id = {tenant:String}"]
        params: dict[str, Any] = {"tenant": tenant_id}
        if object_type is not None:
            where.append("object_type = {t:String}")
            params["t"] = object_type
        if object_id is not None:
            where.append("object_id = {id:String}")
            params["id"] = object_id
        rows = self.store.query_rows(
            f"SELECT object_type, object_id, at, action, actor, data FROM {self.db}.audit_log "
            f"WHERE {' AND '.join(where)} ORDER BY at, object_type, object_id",
            params,
        )
        return [
            AuditRecord(
                object_type=t, object_id=i, at=_utc(at), action=a, actor=who, data=orjson.loads(d)
            )
            for t, i, at, a, who, d in rows
        ]

    # --- leases -------------------------------------------------------------------------------

    def _lease_rows(self, where: str, params: dict[str, Any]) -> list[LeaseRow]:
        rows = self.store.query_rows(
            "SELECT tenant_id, name, seq, owner, toUnixTimestamp64Milli(acquired_at), "
            f"toUnixTimestamp64Milli(expires_at) FROM {self.db}.leases FINAL "
            f"WHERE tenant_id = {{tenant:String}} AND name = {{name:String}}{where} "
            "ORDER BY seq DESC LIMIT 1",
            params,
        )
        return [
            LeaseRow(str(t), str(n), int(s), str(o), int(a), int(e)) for t, n, s, o, a, e in rows
        ]

    def lease_head(self, tenant_id: str, name: str) -> LeaseRow | None:
        found = self._lease_rows("", {"tenant": tenant_id, "name": name})
        return found[0] if found else None

    def lease_at(self, tenant_id: str, name: str, seq: int) -> LeaseRow | None:
        found = self._lease_rows(
            " AND seq = {seq:UInt64}", {"tenant": tenant_id, "name": name, "seq": seq}
        )
        return found[0] if found else None

    def _insert_lease(self, row: LeaseRow, version: int, settings: dict[str, Any]) -> None:
        self.store.insert(
            "leases",
            [
                (
                    row.tenant_id,
                    row.name,
                    row.seq,
                    row.owner,
                    from_epoch_ms(row.acquired_ms),
                    from_epoch_ms(max(0, row.expires_ms)),
                    version,
                )
            ],
            ["tenant_id", "name", "seq", "owner", "acquired_at", "expires_at", "version"],
            settings=settings,
        )

    def acquire_lease(self, row: LeaseRow) -> None:
        token = token_of("lease", row.tenant_id, row.name, str(row.seq))
        self._insert_lease(row, 1, {**DEDUP, "insert_deduplication_token": token})

    def renew_lease(self, row: LeaseRow, version: int) -> None:
        self._insert_lease(row, version, {"insert_deduplicate": 0})

    # --- webhooks -----------------------------------------------------------------------------

    def endpoints(self, tenant_id: str) -> list[tuple[WebhookEndpoint, int]]:
        rows = self.store.query_rows(
            f"SELECT doc, secret_version FROM {self.db}.webhook_endpoints FINAL "
            "WHERE tenant_id = {tenant:String} ORDER BY created_at, endpoint_id",
            {"tenant": tenant_id},
        )
        return [(WebhookEndpoint.model_validate_json(d), int(v)) for d, v in rows]

    def write_endpoint(self, tenant_id: str, ep: WebhookEndpoint, secret_version: int) -> None:
        self.store.insert(
            "webhook_endpoints",
            [
                (
                    tenant_id,
                    ep.id,
                    ep.model_dump_json(exclude={"secret"}),
                    secret_version,
                    int(ep.disabled),
                    ep.created_at,
                    self.versions.next(),
                )
            ],
            [
                "tenant_id",
                "endpoint_id",
                "doc",
                "secret_version",
                "disabled",
                "created_at",
                "version",
            ],
        )

    def deliveries(
        self,
        tenant_id: str,
        endpoint_id: str | None = None,
        event_ids: Iterable[str] | None = None,
        ids: Iterable[str] | None = None,
        limit: int = 1000,
    ) -> list[Delivery]:
        where = ["tenant_id = {tenant:String}"]
        params: dict[str, Any] = {"tenant": tenant_id, "limit": limit}
        if endpoint_id is not None:
            where.append("endpoint_id = {ep:String}")
            params["ep"] = endpoint_id
        if event_ids is not None:
            where.append("event_id IN {evs:Array(String)}")
            params["evs"] = sorted(set(event_ids))
        if ids is not None:
            where.append("delivery_id IN {ids:Array(String)}")
            params["ids"] = sorted(set(ids))
        rows = self.store.query_rows(
            f"SELECT doc FROM {self.db}.webhook_deliveries FINAL WHERE {' AND '.join(where)} "
            "ORDER BY created_at, delivery_id LIMIT {limit:UInt32}",
            params,
        )
        return [Delivery.model_validate_json(r[0]) for r in rows]

    def write_deliveries(
        self, tenant_id: str, deliveries: Sequence[Delivery], *, create: bool = False
    ) -> None:
        if not deliveries:
            return
        rows = [
            (
                tenant_id,
                d.id,
                d.endpoint_id,
                d.event_id,
                d.event_type,
                d.status.value,
                d.next_attempt_at or d.updated_at,
                d.model_dump_json(exclude={"log"}),
                d.created_at,
                1 if create else self.versions.next(),
            )
            for d in deliveries
        ]
        self.store.insert(
            "webhook_deliveries",
            rows,
            [
                "tenant_id",
                "delivery_id",
                "endpoint_id",
                "event_id",
                "event_type",
                "status",
                "next_attempt_at",
                "doc",
                "created_at",
                "version",
            ],
        )

    def due_deliveries(self, now: datetime, limit: int = 100) -> list[tuple[str, Delivery]]:
        """Pending deliveries of every tenant due by ``now`` (the dispatcher's scheduling read)."""
        rows = self.store.query_rows(
            f"SELECT tenant_id, doc FROM (SELECT tenant_id, doc, status, next_attempt_at "
            f"FROM {self.db}.webhook_deliveries FINAL) WHERE status = 'pending' "
            "AND next_attempt_at <= {now:DateTime64(3, 'UTC')} "
            "ORDER BY next_attempt_at LIMIT {limit:UInt32}",
            {"now": now, "limit": limit},
        )
        return [(str(t), Delivery.model_validate_json(d)) for t, d in rows]

    def append_attempt(self, tenant_id: str, delivery_id: str, a: DeliveryAttempt) -> None:
        self.store.insert(
            "webhook_attempts",
            [
                (
                    tenant_id,
                    delivery_id,
                    a.attempt,
                    a.at,
                    a.status_code if a.status_code is not None else -1,
                    a.error,
                    a.duration_ms,
                )
            ],
            ["tenant_id", "delivery_id", "attempt", "at", "status_code", "error", "duration_ms"],
        )

    def attempts(self, tenant_id: str, delivery_id: str) -> list[DeliveryAttempt]:
        rows = self.store.query_rows(
            f"SELECT attempt, at, status_code, error, duration_ms FROM {self.db}.webhook_attempts "
            "FINAL WHERE tenant_id = {tenant:String} AND delivery_id = {id:String} ORDER BY attempt",
            {"tenant": tenant_id, "id": delivery_id},
        )
        return [
            DeliveryAttempt(
                attempt=int(n),
                at=_utc(at),
                status_code=None if int(code) < 0 else int(code),
                error=str(err),
                duration_ms=int(ms),
            )
            for n, at, code, err, ms in rows
        ]

    # --- thresholds ---------------------------------------------------------------------------

    def thresholds(self, tenant_id: str, customer_id: str | None = None) -> list[Threshold]:
        params: dict[str, Any] = {"tenant": tenant_id}
        extra = ""
        if customer_id is not None:
            extra = " AND customer_id = {cust:String}"
            params["cust"] = customer_id
        rows = self.store.query_rows(
            f"SELECT doc FROM {self.db}.usage_thresholds FINAL WHERE tenant_id = {{tenant:String}}"
            f"{extra} ORDER BY customer_id, created_at, threshold_id",
            params,
        )
        found = [Threshold.model_validate_json(r[0]) for r in rows]
        return [t for t in found if not t.deleted]

    def write_threshold(self, tenant_id: str, t: Threshold) -> None:
        self.store.insert(
            "usage_thresholds",
            [
                (
                    tenant_id,
                    t.customer_id,
                    t.id,
                    t.meter_slug,
                    t.model_dump_json(),
                    t.created_at,
                    self.versions.next(),
                )
            ],
            [
                "tenant_id",
                "customer_id",
                "threshold_id",
                "meter_slug",
                "doc",
                "created_at",
                "version",
            ],
        )

    def endpoint_tenants(self) -> list[str]:
        """Tenants with webhook endpoints (the dispatcher's reconciliation: a scheduling read)."""
        rows = self.store.query_rows(
            f"SELECT DISTINCT tenant_id FROM {self.db}.webhook_endpoints ORDER BY tenant_id"
        )
        return [str(r[0]) for r in rows]

    def threshold_tenants(self) -> list[str]:
        """Tenants that have thresholds (the threshold task's scheduling read)."""
        rows = self.store.query_rows(
            f"SELECT DISTINCT tenant_id FROM {self.db}.usage_thresholds ORDER BY tenant_id"
        )
        return [str(r[0]) for r in rows]
