"""SQL builders for usage queries: pure functions returning ``(sql, params)``, no I/O.

Usage is served from the pre-aggregates only (never from ``events``): the stream's rows of
``usage_minute`` (``origin = 's'``) plus the rows of the meter's latest COMPLETE backfill run
(``usage_backfill``; ``clickhouse.backfill.BACKFILL_ORIGIN_SQL`` picks it inside the same
statement), so a query never sees a half-written run and keeps the previous one meanwhile. Every value
is a query parameter (``{name:Type}``); the only identifier spliced into the text, the database,
is validated. The result columns are::

    window_start_s, window_end_s, customer?, d0.., value

``window_*_s`` are epoch seconds (UInt32), or absent without a window (the caller uses
``[from, to)``); ``customer`` only when grouping by customer; ``d<i>`` the i-th meter dimension
of ``q.dimensions``.

Windows (in the IANA zone ``tz``):

- MINUTE: the stored minute itself.
- HOUR: starts at the latest instant at or before the minute whose local clock shows HH:00. Every
  zone offset since 1972 is a multiple of 15 minutes, so that instant is one of the 9 quarter
  hours at or before the minute. (ClickHouse's ``toStartOfInterval(.., HOUR, tz)`` counts hours
  from local midnight and gets HH:30 windows after Lord Howe's 30-minute DST change.)
- DAY / MONTH: ``toStartOfInterval`` in ``tz`` (correct across DST, 23/25-hour days); the end is
  the start of the next local day/month.
"""

from __future__ import annotations

from typing import Any

from clickhouse.backfill import backfill_origin_sql
from clickhouse.store import check_identifier
from schemas.meters import Aggregation
from schemas.timeutil import epoch_ms
from schemas.usage import CUSTOMER, UsageQuery, WindowSize

VALUE_SQL: dict[Aggregation, str] = {
    Aggregation.COUNT: "sum(events)",
    Aggregation.SUM: "sum(value_sum)",
    Aggregation.MIN: "min(value_min)",
    Aggregation.MAX: "max(value_max)",
    Aggregation.AVG: "sum(value_sum) / nullIf(sum(value_count), 0)",
    Aggregation.UNIQUE_COUNT: "length(groupUniqArrayArray(uniq_values))",
    # latest = max of (time_ms, event_id, value): the newest event, ties broken by the larger id;
    # rows without any value carry (0, '', 0) and give NULL.
    Aggregation.LATEST: "if(tupleElement(max(latest), 2) = '', NULL, tupleElement(max(latest), 3))",
}

_HOUR_START = (
    "arrayFirst(x -> toMinute(x, {tz:String}) = 0, "
    "arrayMap(k -> toStartOfFifteenMinutes(window_start) - toIntervalMinute(15 * k), range(9)))"
)
_HOUR_END = (
    "arrayFirst(x -> toMinute(x, {tz:String}) = 0, "
    "arrayMap(k -> bucket + toIntervalMinute(15 * k), range(1, 10)))"
)
WINDOW_SQL: dict[WindowSize, tuple[str, str]] = {
    # (bucket start expression over window_start, bucket end expression over `bucket`)
    WindowSize.MINUTE: ("toStartOfMinute(window_start)", "bucket + toIntervalMinute(1)"),
    WindowSize.HOUR: (_HOUR_START, _HOUR_END),
    WindowSize.DAY: (
        "toStartOfInterval(window_start, INTERVAL 1 DAY, {tz:String})",
        "toStartOfInterval(bucket + INTERVAL 1 DAY, INTERVAL 1 DAY, {tz:String})",
    ),
    WindowSize.MONTH: (
        "toDateTime(toStartOfInterval(window_start, INTERVAL 1 MONTH, {tz:String}), {tz:String})",
        "bucket + INTERVAL 1 MONTH",
    ),
}


_SOURCE_COLUMNS = (
    "tenant_id, meter_id, customer, window_start, group_key, group_values, events, value_count, "
    "value_sum, value_min, value_max, uniq_values, latest"
)


def usage_source(database: str) -> str:
    """The rows a usage query of the meter ``{meter:String}`` reads: the stream's plus those of
    the meter's latest complete backfill run (legacy runs of older versions live in
    ``usage_minute`` under their ``b:`` origin)."""
    db = check_identifier(database)
    visible = backfill_origin_sql(db)
    key = "tenant_id = {tenant:String} AND meter_id = {meter:String}"
    return (
        f"(SELECT {_SOURCE_COLUMNS} FROM {db}.usage_minute WHERE {key} "
        f"AND origin IN ('s', {visible}) "
        f"UNION ALL SELECT {_SOURCE_COLUMNS} FROM {db}.usage_backfill WHERE {key} "
        f"AND origin = {visible})"
    )


def usage_sql(q: UsageQuery, database: str) -> tuple[str, dict[str, Any]]:
    """The SQL and parameters answering ``q`` from ``usage_source``."""
    db = check_identifier(database)
    params: dict[str, Any] = {
        "tenant": q.tenant_id,
        "meter": q.meter.id,
        "from_ms": epoch_ms(q.from_),
        "to_ms": epoch_ms(q.to),
    }
    select: list[str] = []
    keys: list[str] = []
    if q.window is not None:
        start, end = WINDOW_SQL[q.window]
        select += [
            f"{start} AS bucket",
            "toUnixTimestamp(bucket) AS window_start_s",
            f"toUnixTimestamp({end}) AS window_end_s",
        ]
        keys.append("bucket")
        if q.window is not WindowSize.MINUTE:
            params["tz"] = q.tz
    if q.per_customer:
        select.append("customer")
        keys.append("customer")
    for i, name in enumerate(q.dimensions):
        params[f"g{i}"] = name
        select.append(f"group_values[{{g{i}:String}}] AS d{i}")
        keys.append(f"d{i}")
    select.append(f"{VALUE_SQL[q.meter.aggregation]} AS value")

    where = [
        "tenant_id = {tenant:String}",
        "meter_id = {meter:String}",
        "window_start >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')",
        "window_start < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')",
    ]
    if q.customers:
        params["customers"] = list(q.customers)
        where.append("customer IN {customers:Array(String)}")
    for i, (name, values) in enumerate(sorted(q.filters.items())):
        params[f"f{i}"] = list(values)
        if name == CUSTOMER:
            where.append(f"customer IN {{f{i}:Array(String)}}")
        else:
            params[f"fk{i}"] = name
            where.append(f"group_values[{{fk{i}:String}}] IN {{f{i}:Array(String)}}")

    # Without any key, group by the (filtered, constant) tenant: no rows when there is no data.
    group = keys or ["tenant_id"]
    sql = (
        "SELECT " + ", ".join(select) + f" FROM {usage_source(db)}"
        " WHERE " + " AND ".join(where) + " GROUP BY " + ", ".join(group)
    )
    if keys:
        sql += " ORDER BY " + ", ".join(keys)
    return sql, params


# Aggregations whose value is a sum of per-event contributions: a correction (void or amend of
# an event) is exact as a signed delta for these. Others (min, max, unique_count, latest, avg)
# are not corrected by deltas; see docs/invoicing.md (corrections).
CORRECTABLE: dict[Aggregation, str] = {
    Aggregation.COUNT: "sum(events)",
    Aggregation.SUM: "sum(value_sum)",
}


def corrections_sql(q: UsageQuery, database: str) -> tuple[str, dict[str, Any]] | None:
    """The signed correction deltas (``usage_corrections``) for ``q``, in the same result
    columns as ``usage_sql(q)``, or None when the meter's aggregation is not correctable.
    ``clickhouse.usage.run_usage`` adds them to the pre-aggregates' values: a separate query, so
    the pre-aggregate SQL stays as it is."""
    value = CORRECTABLE.get(q.meter.aggregation)
    if value is None:
        return None
    db = check_identifier(database)
    params: dict[str, Any] = {
        "tenant": q.tenant_id,
        "meter": q.meter.id,
        "from_ms": epoch_ms(q.from_),
        "to_ms": epoch_ms(q.to),
    }
    select: list[str] = []
    keys: list[str] = []
    if q.window is not None:
        start, end = WINDOW_SQL[q.window]
        select += [
            f"{start} AS bucket",
            "toUnixTimestamp(bucket) AS window_start_s",
            f"toUnixTimestamp({end}) AS window_end_s",
        ]
        keys.append("bucket")
        if q.window is not WindowSize.MINUTE:
            params["tz"] = q.tz
    if q.per_customer:
        select.append("customer")
        keys.append("customer")
    for i, name in enumerate(q.dimensions):
        params[f"g{i}"] = name
        select.append(f"group_values[{{g{i}:String}}] AS d{i}")
        keys.append(f"d{i}")
    select.append(f"{value} AS value")
    where = [
        "tenant_id = {tenant:String}",
        "meter_id = {meter:String}",
        "window_start >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')",
        "window_start < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')",
    ]
    if q.customers:
        params["customers"] = list(q.customers)
        where.append("customer IN {customers:Array(String)}")
    for i, (name, values) in enumerate(sorted(q.filters.items())):
        params[f"f{i}"] = list(values)
        if name == CUSTOMER:
            where.append(f"customer IN {{f{i}:Array(String)}}")
        else:
            params[f"fk{i}"] = name
            where.append(f"group_values[{{fk{i}:String}}] IN {{f{i}:Array(String)}}")
    group = keys or ["tenant_id"]
    sql = (
        "SELECT " + ", ".join(select) + f" FROM {db}.usage_corrections FINAL"
        " WHERE " + " AND ".join(where) + " GROUP BY " + ", ".join(group)
    )
    if keys:
        sql += " ORDER BY " + ", ".join(keys)
    return sql, params
