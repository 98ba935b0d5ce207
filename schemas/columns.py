"""The worker's row contracts, columnar: Arrow schemas of the ``events`` and ``usage_minute``
batches that ``streams`` builds and ``clickhouse.sink`` inserts with ``insert_arrow`` (no per-value
Python encoding), and the named row types the same columns have as Python values.

Times are epoch milliseconds in ``timestamp('ms', 'UTC')`` columns (no ``datetime`` per event);
values are ``decimal128(38, 9)`` (the store's ``Decimal(38, 9)``, never float); ``latest`` is a
struct ``(time_ms, event_id, value)`` (the store's ``Tuple(Int64, String, Decimal(38, 9))``);
``group_values`` a ``map<string, string>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

import pyarrow as pa

from schemas.timeutil import epoch_ms

TIME = pa.timestamp("ms", tz="UTC")
DECIMAL = pa.decimal128(38, 9)
LATEST = pa.struct([("time_ms", pa.int64()), ("event_id", pa.string()), ("value", DECIMAL)])
GROUP_VALUES = pa.map_(pa.string(), pa.string())

EVENTS_SCHEMA = pa.schema(
    [
        ("tenant_id", pa.string()),
        ("event_id", pa.string()),
        ("event_type", pa.string()),
        ("customer", pa.string()),
        ("time", TIME),
        ("properties", pa.string()),
        ("ingested_at", TIME),
        ("source_topic", pa.string()),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
        ("source_index", pa.uint32()),
    ]
)

USAGE_SCHEMA = pa.schema(
    [
        ("tenant_id", pa.string()),
        ("meter_id", pa.string()),
        ("customer", pa.string()),
        ("window_start", TIME),
        ("group_key", pa.string()),
        ("origin", pa.string()),
        ("group_values", GROUP_VALUES),
        ("events", pa.uint64()),
        ("value_count", pa.uint64()),
        ("value_sum", DECIMAL),
        ("value_min", DECIMAL),
        ("value_max", DECIMAL),
        ("uniq_values", pa.list_(pa.string())),
        ("latest", LATEST),
        ("source_offset", pa.int64()),
    ]
)

EVENTS_COLUMNS: list[str] = EVENTS_SCHEMA.names
USAGE_COLUMNS: list[str] = USAGE_SCHEMA.names


class EventRow(NamedTuple):
    """One ``events`` row as Python values (tests, tools; the worker builds columns)."""

    tenant_id: str
    event_id: str
    event_type: str
    customer: str
    time: datetime
    properties: str
    ingested_at: datetime
    source_topic: str
    source_partition: int
    source_offset: int
    source_index: int


class UsageRow(NamedTuple):
    """One ``usage_minute`` row (a per-minute delta, or a progress row) as Python values."""

    tenant_id: str
    meter_id: str
    customer: str
    window_start: datetime
    group_key: str
    origin: str
    group_values: dict[str, str]
    events: int
    value_count: int
    value_sum: Decimal
    value_min: Decimal | None
    value_max: Decimal | None
    uniq_values: list[str]
    latest: tuple[int, str, Decimal]
    source_offset: int


def empty_events() -> pa.Table:
    return EVENTS_SCHEMA.empty_table()


def empty_usage() -> pa.Table:
    return USAGE_SCHEMA.empty_table()


def _ms_of(value: datetime | int) -> int:
    return value if isinstance(value, int) else epoch_ms(value)


def events_table(rows: Sequence[Sequence[Any]]) -> pa.Table:
    """Arrow batch of ``EventRow``-shaped tuples (times as aware datetimes or epoch ms)."""
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in EVENTS_COLUMNS]
    arrays = []
    for name, col in zip(EVENTS_COLUMNS, cols, strict=True):
        values: Iterable[Any] = col
        if name in ("time", "ingested_at"):
            values = [_ms_of(v) for v in col]
        arrays.append(pa.array(list(values), EVENTS_SCHEMA.field(name).type))
    return pa.Table.from_arrays(arrays, schema=EVENTS_SCHEMA)


def usage_table(rows: Sequence[Sequence[Any]]) -> pa.Table:
    """Arrow batch of ``UsageRow``-shaped tuples."""
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in USAGE_COLUMNS]
    arrays = []
    for name, col in zip(USAGE_COLUMNS, cols, strict=True):
        values: list[Any] = list(col)
        if name == "window_start":
            values = [_ms_of(v) for v in values]
        elif name == "group_values":
            values = [list(v.items()) for v in values]
        elif name == "latest":
            values = [{"time_ms": t, "event_id": e, "value": v} for t, e, v in values]
        arrays.append(pa.array(values, USAGE_SCHEMA.field(name).type))
    return pa.Table.from_arrays(arrays, schema=USAGE_SCHEMA)


def usage_rows(table: pa.Table) -> list[UsageRow]:
    """The rows of a usage batch as ``UsageRow`` (aware datetimes, dicts, latest tuples)."""
    out = []
    for r in table.to_pylist():
        latest = r["latest"]
        out.append(
            UsageRow(
                r["tenant_id"],
                r["meter_id"],
                r["customer"],
                r["window_start"],
                r["group_key"],
                r["origin"],
                dict(r["group_values"]),
                r["events"],
                r["value_count"],
                r["value_sum"],
                r["value_min"],
                r["value_max"],
                list(r["uniq_values"]),
                (latest["time_ms"], latest["event_id"], latest["value"]),
                r["source_offset"],
            )
        )
    return out


def event_rows(table: pa.Table) -> list[EventRow]:
    """The rows of an events batch as ``EventRow`` (aware datetimes)."""
    return [EventRow(**r) for r in table.to_pylist()]
