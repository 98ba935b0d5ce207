"""Per-tenant limit overrides and monthly accepted-event counts (migration 060).

``tenant_limits`` holds one row per tenant (newest ``version`` wins): each limit is NULL (use the
default from settings), 0 (unlimited) or a positive value. ``tenant_monthly_events`` holds deltas
of accepted events per tenant and UTC month, written in batches by every API process; the month's
total is their sum. Enforcement lives in ``api.limits``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

from clickhouse.store import Store
from schemas.timeutil import epoch_ms, utc_now

LIMIT_NAMES = ("requests_per_second", "events_per_second", "max_batch_events", "monthly_events")


@dataclass(frozen=True)
class LimitOverrides:
    """A tenant's overrides; None = the default from settings, 0 = unlimited."""

    requests_per_second: float | None = None
    events_per_second: float | None = None
    max_batch_events: int | None = None
    monthly_events: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _overrides(rps: Any, eps: Any, batch: Any, monthly: Any) -> LimitOverrides:
    return LimitOverrides(
        None if rps is None else float(rps),
        None if eps is None else float(eps),
        None if batch is None else int(batch),
        None if monthly is None else int(monthly),
    )


class LimitsRepo:
    """Reads and writes of ``tenant_limits`` and ``tenant_monthly_events``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.database
        self._lock = threading.Lock()
        self._last_version = 0

    def _version(self) -> int:
        with self._lock:
            self._last_version = max(epoch_ms(utc_now()), self._last_version + 1)
            return self._last_version

    def get(self, tenant_id: str) -> LimitOverrides:
        rows = self.store.query_rows(
            "SELECT requests_per_second, events_per_second, max_batch_events, monthly_events "
            f"FROM {self.db}.tenant_limits FINAL WHERE tenant_id = {{tenant:String}}",
            {"tenant": tenant_id},
        )
        if not rows:
            return LimitOverrides()
        return _overrides(*rows[0])

    def get_many(self, tenant_ids: Sequence[str]) -> dict[str, LimitOverrides]:
        """``get`` for many tenants in one read (tenants without overrides: all defaults)."""
        if not tenant_ids:
            return {}
        rows = self.store.query_rows(
            "SELECT tenant_id, requests_per_second, events_per_second, max_batch_events, "
            f"monthly_events FROM {self.db}.tenant_limits FINAL "
            "WHERE tenant_id IN {tenants:Array(String)}",
            {"tenants": sorted(set(tenant_ids))},
        )
        out = dict.fromkeys(tenant_ids, LimitOverrides())
        for tenant_id, *values in rows:
            out[tenant_id] = _overrides(*values)
        return out

    def put(self, tenant_id: str, limits: LimitOverrides) -> None:
        self.store.insert(
            "tenant_limits",
            [
                (
                    tenant_id,
                    limits.requests_per_second,
                    limits.events_per_second,
                    limits.max_batch_events,
                    limits.monthly_events,
                    utc_now(),
                    self._version(),
                )
            ],
            ["tenant_id", *LIMIT_NAMES, "updated_at", "version"],
        )

    def month_totals(self, tenant_ids: list[str], month: date) -> dict[str, int]:
        """Accepted events of each tenant in ``month`` (first day of a UTC month)."""
        if not tenant_ids:
            return {}
        rows = self.store.query_rows(
            f"SELECT tenant_id, sum(events) FROM {self.db}.tenant_monthly_events "
            "WHERE tenant_id IN {tenants:Array(String)} AND month = {month:Date} "
            "GROUP BY tenant_id",
            {"tenants": tenant_ids, "month": month},
        )
        out = dict.fromkeys(tenant_ids, 0)
        out.update({t: int(n) for t, n in rows})
        return out

    def add_month_counts(self, counts: dict[tuple[str, date], int]) -> None:
        """``{(tenant_id, month): accepted events}`` deltas -> one insert."""
        rows = [(t, m, n) for (t, m), n in sorted(counts.items()) if n > 0]
        self.store.insert("tenant_monthly_events", rows, ["tenant_id", "month", "events"])
