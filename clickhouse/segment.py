"""Per-tenant Segment settings (``segment_settings``, migration 040), read with ``FINAL``.

The webhook secrets arrive here already sealed (``api.secretbox``); this module never sees a
plaintext secret. A change is a new row with a higher version.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from clickhouse.store import Store
from schemas.timeutil import epoch_ms, utc_now

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
COLUMNS = [
    "tenant_id",
    "customer_property",
    "fallback_to_user",
    "secret_sealed",
    "secret_set_at",
    "previous_sealed",
    "previous_until",
    "version",
]


@dataclass(frozen=True, slots=True)
class SegmentSettings:
    tenant_id: str
    customer_property: str = ""  # '' = userId, else anonymousId
    fallback_to_user: bool = False
    secret_sealed: str = ""
    secret_set_at: datetime | None = None
    previous_sealed: str = ""
    previous_until: datetime | None = None

    def changed(self, **kw: object) -> SegmentSettings:
        return replace(self, **kw)  # type: ignore[arg-type]


def _opt(dt: datetime) -> datetime | None:
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return None if dt <= _EPOCH else dt


class SegmentRepo:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._last = 0
        self._lock = threading.Lock()

    def _version(self) -> int:
        with self._lock:
            self._last = max(epoch_ms(utc_now()), self._last + 1)
            return self._last

    def get(self, tenant_id: str) -> SegmentSettings:
        rows = self.store.query_rows(
            f"SELECT {', '.join(COLUMNS[:-1])} FROM {self.store.database}.segment_settings FINAL "
            "WHERE tenant_id = {tenant:String}",
            {"tenant": tenant_id},
        )
        if not rows:
            return SegmentSettings(tenant_id)
        t, prop, fallback, sealed, set_at, prev, until = rows[0]
        return SegmentSettings(
            tenant_id=t,
            customer_property=prop,
            fallback_to_user=bool(fallback),
            secret_sealed=sealed,
            secret_set_at=_opt(set_at),
            previous_sealed=prev,
            previous_until=_opt(until),
        )

    def put(self, s: SegmentSettings) -> None:
        self.store.insert(
            "segment_settings",
            [
                (
                    s.tenant_id,
                    s.customer_property,
                    int(s.fallback_to_user),
                    s.secret_sealed,
                    s.secret_set_at or _EPOCH,
                    s.previous_sealed,
                    s.previous_until or _EPOCH,
                    self._version(),
                )
            ],
            COLUMNS,
        )
