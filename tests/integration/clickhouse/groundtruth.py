"""Test helpers: raw events -> usage_minute delta rows, and an independent ground truth;
one correction effect row written straight to the store (``correction_row``).

The ground truth works on the raw events with Python's zoneinfo; it shares no code with
clickhouse.queries (which works on the delta rows in SQL).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_DOWN, Decimal
from zoneinfo import ZoneInfo

from clickhouse.corrections import CORRECTION_COLUMNS
from clickhouse.store import Store
from schemas.meters import Aggregation
from schemas.timeutil import epoch_ms

MINUTE = timedelta(minutes=1)


@dataclass(frozen=True)
class Ev:
    event_id: str
    customer: str
    time: datetime  # aware UTC, ms precision
    value: Decimal
    dims: dict[str, str] = field(default_factory=dict)

    @property
    def minute(self) -> datetime:
        return self.time.replace(second=0, microsecond=0)


def group_key(dims: dict[str, str]) -> str:
    return json.dumps(dims, sort_keys=True, separators=(",", ":")) if dims else ""


def delta_rows(tenant_id: str, meter_id: str, events: list[Ev], origin: str = "s") -> list[tuple]:
    """One usage row per (customer, minute, group) of ``events`` (one flush's deltas)."""
    acc: dict[tuple, list[Ev]] = {}
    for e in events:
        acc.setdefault((e.customer, e.minute, group_key(e.dims)), []).append(e)
    rows = []
    for (customer, minute, gk), evs in acc.items():
        values = [e.value for e in evs]
        top = max(evs, key=lambda e: (epoch_ms(e.time), e.event_id))
        rows.append(
            (
                tenant_id,
                meter_id,
                customer,
                minute,
                gk,
                origin,
                dict(evs[0].dims),
                len(evs),
                len(values),
                sum(values, Decimal(0)),
                min(values),
                max(values),
                sorted({str(v) for v in values}),
                (epoch_ms(top.time), top.event_id, top.value),
                0,
            )
        )
    return rows


# --- windows in a time zone, computed independently with zoneinfo ---------------------------


def _local_midnight(d: date, z: ZoneInfo) -> datetime:
    return datetime.combine(d, time(0), tzinfo=z).astimezone(UTC)


def window_of(t: datetime, window: str | None, tz: str) -> tuple[datetime, datetime] | None:
    z = ZoneInfo(tz)
    if window is None:
        return None
    if window == "MINUTE":
        s = t.replace(second=0, microsecond=0)
        return s, s + MINUTE
    if window == "HOUR":
        # the latest instant <= t at which the local clock shows HH:00, and the next one
        s = t.replace(second=0, microsecond=0)
        while s.astimezone(z).minute != 0:
            s -= MINUTE
        e = s + MINUTE
        while e.astimezone(z).minute != 0:
            e += MINUTE
        return s, e
    local = t.astimezone(z).date()
    if window == "DAY":
        return _local_midnight(local, z), _local_midnight(local + timedelta(days=1), z)
    if window == "MONTH":
        first = local.replace(day=1)
        nxt = (first + timedelta(days=32)).replace(day=1)
        return _local_midnight(first, z), _local_midnight(nxt, z)
    raise ValueError(window)


def aggregate(aggregation: Aggregation, evs: list[Ev]) -> Decimal | None:
    values = [e.value for e in evs]
    if aggregation == Aggregation.COUNT:
        return Decimal(len(evs))
    if aggregation == Aggregation.SUM:
        return sum(values, Decimal(0))
    if aggregation == Aggregation.MIN:
        return min(values)
    if aggregation == Aggregation.MAX:
        return max(values)
    if aggregation == Aggregation.AVG:
        return (sum(values, Decimal(0)) / len(values)).quantize(
            Decimal("1e-9"), rounding=ROUND_DOWN
        )
    if aggregation == Aggregation.UNIQUE_COUNT:
        return Decimal(len({str(v) for v in values}))
    if aggregation == Aggregation.LATEST:
        return max(evs, key=lambda e: (epoch_ms(e.time), e.event_id)).value
    raise ValueError(aggregation)


def ground_truth(
    events: list[Ev],
    aggregation: Aggregation,
    *,
    from_: datetime,
    to: datetime,
    window: str | None,
    tz: str = "UTC",
    group_by: tuple[str, ...] = (),
    per_customer: bool = False,
    customers: tuple[str, ...] = (),
    filters: dict[str, list[str]] | None = None,
) -> list[tuple[datetime, datetime, str | None, dict[str, str], Decimal | None]]:
    """Expected rows ``(window_start, window_end, customer, group_by, value)``, sorted like
    run_usage: by window start, customer, dimensions."""
    buckets: dict[tuple, list[Ev]] = {}
    for e in events:
        if not from_ <= e.minute < to:
            continue
        if customers and e.customer not in customers:
            continue
        ok = True
        for name, allowed in (filters or {}).items():
            v = e.customer if name == "customer" else e.dims.get(name, "")
            ok = ok and v in allowed
        if not ok:
            continue
        w = window_of(e.minute, window, tz) or (from_, to)
        key = (
            w,
            e.customer if per_customer else None,
            tuple(e.dims.get(g, "") for g in group_by),
        )
        buckets.setdefault(key, []).append(e)
    out = []
    for (w, customer, dims), evs in buckets.items():
        out.append(
            (
                w[0],
                w[1],
                customer,
                dict(zip(group_by, dims, strict=True)),
                aggregate(aggregation, evs),
            )
        )
    out.sort(key=lambda r: (r[0], r[2] or "", tuple(r[3].values())))
    return out


def correction_row(
    store: Store, tenant_id: str, meter_id: str, seq: int, window: datetime, customer: str = "cust"
) -> None:
    """One effect row of a correction written straight to the store: +1 event of ``meter_id``
    for ``customer`` in the minute ``window`` (what another process's correction leaves)."""
    row = dict.fromkeys(CORRECTION_COLUMNS)
    row.update(
        tenant_id=tenant_id,
        seq=seq,
        correction_id=f"c{seq}",
        event_id="e1",
        meter_id=meter_id,
        customer=customer,
        window_start=window,
        group_key="",
        side="s",
        group_values={},
        events=1,
        value_count=0,
        value_sum=0,
        action="void",
        properties="",
        doc="",
        created_at=window,
        rank=1,
    )
    store.insert("corrections", [tuple(row.values())], CORRECTION_COLUMNS)
