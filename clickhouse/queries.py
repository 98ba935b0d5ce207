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

from clickhouse.backfill import backfill_origin_sql, backfill_seq_sql
from clickhouse.rollup import UTC_ZONES, day_meter_id, whole_days
from clickhouse.store import check_identifier
from schemas.corrections import ADDITIVE
from schemas.meters import Aggregation
from schemas.timeutil import epoch_ms
from schemas.usage import CUSTOMER, UsageQuery, WindowSize

# Sums of windows in Decimal(76, 9): ClickHouse's sum of a Decimal(38, 9) column is a
# Decimal(38, 9) that wraps without an error past 10^29 (a month of large values can get there).
_WIDE_SUM = "sum(toDecimal256(value_sum, 9))"
VALUE_SQL: dict[Aggregation, str] = {
    Aggregation.COUNT: "sum(events)",
    Aggregation.SUM: _WIDE_SUM,
    Aggregation.MIN: "min(value_min)",
    Aggregation.MAX: "max(value_max)",
    Aggregation.AVG: f"{_WIDE_SUM} / nullIf(sum(value_count), 0)",
    # the distinct values of all the rows' arrays, counted in one hash set per group (no array
    # of the values built and then measured, as length(groupUniqArrayArray(...)) did)
    Aggregation.UNIQUE_COUNT: "uniqExactArray(uniq_values)",
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
    "tenant_id, meter_id, customer, window_start, group_key, group_values, "
    "toInt64(events) AS events, toInt64(value_count) AS value_count, value_sum, value_min, "
    "value_max, uniq_values, latest"
)
# Effect rows of corrections (signed deltas), in the columns of _SOURCE_COLUMNS.
_DELTA_COLUMNS = (
    "tenant_id, meter_id, customer, window_start, group_key, group_values, events, value_count, "
    "value_sum, CAST(NULL AS Nullable(Decimal(38, 9))) AS value_min, "
    "CAST(NULL AS Nullable(Decimal(38, 9))) AS value_max, CAST([] AS Array(String)) AS uniq_values, "
    "CAST((0, '', 0) AS Tuple(Int64, String, Decimal(38, 9))) AS latest"
)
_KEY = "tenant_id = {tenant:String} AND meter_id = {meter:String}"
_WINDOW_KEY = "(customer, window_start, group_key)"


def visible_run_sql(database: str) -> tuple[str, str]:
    """(origin of the meter's latest complete backfill run ('b:' if none), the corrections that
    run applied in its own scan): scalar subqueries on ``{tenant:String}``/``{meter:String}``."""
    return backfill_origin_sql(database), backfill_seq_sql(database)


def usage_source(
    database: str,
    aggregation: Aggregation = Aggregation.SUM,
    *,
    overrides: bool = True,
    narrow: str = "",
) -> str:
    """The rows a usage query of the meter ``{meter:String}`` reads (columns of
    ``_SOURCE_COLUMNS``): the stream's (origin 's') plus those of the meter's latest complete
    backfill run (legacy runs of older versions live in ``usage_minute`` under their ``b:``
    origin), with event corrections applied:

    - count, sum, avg: plus the corrections' effect rows (signed deltas) of side 's', and of
      side 'b' newer than the corrections the visible run applied itself (none without a run:
      an event no run counted has nothing to take back);
    - min, max, unique_count, latest: a minute window (customer, minute, group) with an
      override is read from ``usage_overrides`` instead of its pre-aggregated rows (side 's':
      always; side 'b': if the override is newer than the visible run's corrections).
      ``overrides=False``: the pre-aggregates alone (the query found no corrected window in
      its range: ``usage_state_sql``), without the cost of the masks. ``narrow``: conditions
      (`` AND ...`` on window_start/customer) of the query, which keep the masks small.
    """
    db = check_identifier(database)
    visible, vseq = visible_run_sql(db)
    if aggregation not in ADDITIVE and not overrides:
        return (
            f"(SELECT {_SOURCE_COLUMNS} FROM {db}.usage_minute WHERE {_KEY} "
            f"AND origin IN ('s', {visible}) "
            f"UNION ALL SELECT {_SOURCE_COLUMNS} FROM {db}.usage_backfill WHERE {_KEY} "
            f"AND origin = {visible})"
        )
    if aggregation in ADDITIVE:
        return (
            f"(SELECT {_SOURCE_COLUMNS} FROM {db}.usage_minute WHERE {_KEY} "
            f"AND origin IN ('s', {visible}) "
            f"UNION ALL SELECT {_SOURCE_COLUMNS} FROM {db}.usage_backfill WHERE {_KEY} "
            f"AND origin = {visible} "
            f"UNION ALL SELECT {_DELTA_COLUMNS} FROM {db}.corrections FINAL WHERE {_KEY} "
            f"AND (side = 's' OR (side = 'b' AND {visible} != 'b:' AND seq > {vseq})))"
        )
    # Rows of customers without any recomputed window are read as they are; only the rows of
    # the others are checked against the masks (the (customer, minute, group) tuple test is
    # the expensive part, and the primary key confines it to those customers' granules).
    okey = _KEY + narrow
    overridden = f"(SELECT DISTINCT customer FROM {db}.usage_overrides WHERE {okey})"
    mask_s = (
        f"(SELECT customer, window_start, group_key FROM {db}.usage_overrides WHERE {okey} "
        "AND side = 's')"
    )
    mask_b = (
        f"(SELECT customer, window_start, group_key FROM {db}.usage_overrides WHERE {okey} "
        f"AND side = 'b' AND seq > {vseq})"
    )
    return (
        f"(SELECT {_SOURCE_COLUMNS} FROM {db}.usage_minute WHERE {_KEY} "
        f"AND origin IN ('s', {visible}) AND customer NOT IN {overridden} "
        f"UNION ALL SELECT {_SOURCE_COLUMNS} FROM {db}.usage_backfill WHERE {_KEY} "
        f"AND origin = {visible} AND customer NOT IN {overridden} "
        f"UNION ALL SELECT {_SOURCE_COLUMNS} FROM {db}.usage_minute WHERE {_KEY} "
        f"AND origin IN ('s', {visible}) AND customer IN {overridden} "
        f"AND NOT ((origin = 's' AND {_WINDOW_KEY} IN {mask_s}) "
        f"OR (origin != 's' AND {_WINDOW_KEY} IN {mask_b})) "
        f"UNION ALL SELECT {_SOURCE_COLUMNS} FROM {db}.usage_backfill WHERE {_KEY} "
        f"AND origin = {visible} AND customer IN {overridden} AND {_WINDOW_KEY} NOT IN {mask_b} "
        f"UNION ALL SELECT {_SOURCE_COLUMNS} FROM {db}.usage_overrides FINAL WHERE {_KEY} "
        f"AND (side = 's' OR (side = 'b' AND {visible} != 'b:' AND seq > {vseq})))"
    )


def usage_sql(
    q: UsageQuery, database: str, *, overrides: bool = True, stream_only: bool = False
) -> tuple[str, dict[str, Any]]:
    """The SQL and parameters answering ``q`` from ``usage_source`` (``overrides``: see there).

    ``stream_only``: read the stream's rows of ``usage_minute`` straight, without the backfill
    and corrections branches and their scalar subqueries (about a third of a customer x month
    query's cost in the store). Only for a query whose ``usage_state_sql`` found no complete
    backfill run of the meter and no correction in its range (``clickhouse.usage``). Its whole
    UTC days are then read from the day rows when every bucket is a union of UTC days (no
    window, or DAY/MONTH windows in UTC: ``clickhouse.rollup``), the rest from the minutes."""
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
    days = _day_span(q) if stream_only else None
    if days is not None:
        # the whole UTC days from the day rows, the partial days at the edges from the minutes
        params["day_meter"] = day_meter_id(q.meter.id)
        params["day_from_ms"], params["day_to_ms"] = days
        source = f"{db}.usage_minute"
        where[1:4] = ["origin = 's'", _DAYS_AND_EDGES]
    elif stream_only:
        source = f"{db}.usage_minute"
        where.insert(2, "origin = 's'")
    else:
        narrow = " AND " + " AND ".join(where[2:4])
        if q.customers:
            narrow += " AND customer IN {customers:Array(String)}"
        source = usage_source(db, q.meter.aggregation, overrides=overrides, narrow=narrow)
    sql = (
        "SELECT " + ", ".join(select) + f" FROM {source}"
        " WHERE " + " AND ".join(where) + " GROUP BY " + ", ".join(group)
    )
    if q.meter.aggregation not in ADDITIVE:
        # a group whose every window lost its events to corrections has no value (no row)
        sql += " HAVING sum(events) > 0"
    if keys:
        sql += " ORDER BY " + ", ".join(keys)
    return sql, params


# [from, to) as the whole days' day rows plus the edges' minute rows: three key ranges
_DAYS_AND_EDGES = (
    "((meter_id = {day_meter:String}"
    " AND window_start >= fromUnixTimestamp64Milli({day_from_ms:Int64}, 'UTC')"
    " AND window_start < fromUnixTimestamp64Milli({day_to_ms:Int64}, 'UTC'))"
    " OR (meter_id = {meter:String}"
    " AND window_start >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')"
    " AND window_start < fromUnixTimestamp64Milli({day_from_ms:Int64}, 'UTC'))"
    " OR (meter_id = {meter:String}"
    " AND window_start >= fromUnixTimestamp64Milli({day_to_ms:Int64}, 'UTC')"
    " AND window_start < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')))"
)


def _day_span(q: UsageQuery) -> tuple[int, int] | None:
    """The whole UTC days of ``q``'s range that its stream rows can be read from as day rows
    (``clickhouse.rollup``): when every bucket of ``q`` is a union of UTC days."""
    if q.window is not None and (
        q.window not in (WindowSize.DAY, WindowSize.MONTH) or q.tz not in UTC_ZONES
    ):
        return None
    return whole_days(epoch_ms(q.from_), epoch_ms(q.to))


def _state_where(q: UsageQuery) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {
        "tenant": q.tenant_id,
        "meter": q.meter.id,
        "from_ms": epoch_ms(q.from_),
        "to_ms": epoch_ms(q.to),
    }
    rng = (
        "window_start >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC') "
        "AND window_start < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')"
    )
    return f"{_KEY} AND {rng}{_customer_filter(q, params)}", params


def usage_state_sql(q: UsageQuery, database: str) -> tuple[str, dict[str, Any]]:
    """One row ``(has_run, dirty)``: whether the meter has a visible backfill run (the same
    ``visible_run_sql`` the full source reads), and how many effect rows of corrections fall in
    ``q``'s range (and customers). Neither: the stream's minute rows alone answer ``q``
    (``usage_sql(stream_only=True)``); dirty 0: a min/max/unique_count/latest query can read
    the pre-aggregates without the overrides."""
    db = check_identifier(database)
    visible, _ = visible_run_sql(db)
    where, params = _state_where(q)
    return (
        f"SELECT {visible} != 'b:', (SELECT count() FROM {db}.corrections WHERE {where})"
    ), params


def stale_overrides_sql(q: UsageQuery, database: str) -> tuple[str, dict[str, Any]]:
    """``(customer, window_start)`` of the minute windows in ``q``'s range (and customers) that
    corrections made dirty (min/max/unique_count/latest meters) and whose override is missing
    or out of date: older than the key's newest correction, or (side 's') computed when the
    stream had pre-aggregated a different number of the key's events (late events arrived
    since). Side 'b' keys matter only above the visible run's own corrections."""
    db = check_identifier(database)
    visible, vseq = visible_run_sql(db)
    where, params = _state_where(q)
    sql = (
        "SELECT DISTINCT d.customer, d.window_start FROM "
        f"(SELECT customer, window_start, group_key, side, max(seq) AS dseq FROM {db}.corrections "
        f"WHERE {where} GROUP BY customer, window_start, group_key, side) AS d "
        "LEFT JOIN (SELECT customer, window_start, group_key, side, seq AS oseq, base_events "
        f"FROM {db}.usage_overrides FINAL WHERE {where}) AS o "
        "USING (customer, window_start, group_key, side) "
        "LEFT JOIN (SELECT customer, window_start, group_key, "
        "CAST('s' AS LowCardinality(String)) AS side, sum(events) AS n "
        f"FROM {db}.usage_minute WHERE {where} AND origin = 's' AND (customer, window_start) IN "
        f"(SELECT customer, window_start FROM {db}.corrections WHERE {where} AND side = 's') "
        "GROUP BY customer, window_start, group_key) AS p "
        "USING (customer, window_start, group_key, side) "
        "WHERE (d.side = 's' AND (o.oseq < d.dseq OR o.base_events != p.n)) "
        f"OR (d.side = 'b' AND {visible} != 'b:' AND d.dseq > {vseq} AND o.oseq < d.dseq) "
        "ORDER BY d.customer, d.window_start"
    )
    return sql, params


def _customer_filter(q: UsageQuery, params: dict[str, Any]) -> str:
    """`` AND customer IN ...`` for the customers ``q`` is restricted to ('' for all)."""
    wanted: set[str] | None = set(q.customers) if q.customers else None
    for name, values in q.filters.items():
        if name == CUSTOMER:
            wanted = set(values) if wanted is None else wanted & set(values)
    if wanted is None:
        return ""
    params["stale_customers"] = sorted(wanted)
    return " AND customer IN {stale_customers:Array(String)}"
