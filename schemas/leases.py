"""A lease row (``leases``, migration 051), shared by ``billing.lease`` and ``clickhouse.billing``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LeaseRow:
    tenant_id: str  # '' for a system-wide lease (the webhook dispatcher)
    name: str
    seq: int
    owner: str  # who acquired row `seq`
    acquired_ms: int
    expires_ms: int  # 0 = released
