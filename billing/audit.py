"""The audit trail: every state change of plans, subscriptions, invoices, credit notes and
corrections is an append-only record with actor and time (``audit_log``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from billing.ports import InvoiceRows
from schemas.billing import AuditRecord
from schemas.timeutil import utc_now


def record(
    rows: InvoiceRows,
    tenant_id: str,
    object_type: str,
    object_id: str,
    action: str,
    actor: str,
    data: dict[str, Any] | None = None,
    at: datetime | None = None,
) -> AuditRecord:
    rec = AuditRecord(
        object_type=object_type,
        object_id=object_id,
        action=action,
        actor=actor,
        at=at or utc_now(),
        data=data or {},
    )
    rows.append_audit(tenant_id, [rec])
    return rec
