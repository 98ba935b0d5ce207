"""Day rows: the stream's usage rows rolled up to UTC days, written in the same insert.

Every usage row the stream writes into ``usage_minute`` (``origin = 's'``, a real tenant) is
written twice in the SAME insert: once as it is (its minute), and once as a *day row*: the same
columns with ``window_start`` floored to the UTC day and ``meter_id`` prefixed with
``DAY_PREFIX``. The prefix puts a meter's day rows in their own range of the table's sort key
(``tenant_id, meter_id, ...``), so a query reads them without touching the minute rows.

Why it stays exact (docs/architecture.md, "Day rows"): a link's day rows are part of its commit
insert, one part deduplicated by the link's chain token, so they land exactly when its minute
rows land, never twice. ``usage_minute`` is an ``AggregatingMergeTree`` whose columns are all
mergeable (sums, min, max, union of arrays, max of ``latest``): the insert collapses the day
rows of one key inside the part, and merges collapse them across parts, to the same values the
day's minute rows aggregate to. Late events add day rows like they add minute rows.

A usage query reads day rows for the whole UTC days of its range when its buckets are unions of
UTC days (no window, or DAY/MONTH windows in UTC) and nothing but the stream's rows applies to it
(``clickhouse.queries.usage_sql(stream_only=True)``); the partial days at the edges come from the
minute rows. Backfill runs and corrections keep to the minute rows.

Writers of ``usage_minute`` rows other than the worker's commit (``ClickHouseSink.commit``,
benchmark generators, migration 070) add the day rows with ``with_day_rows`` or
``day_rows_sql``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from clickhouse.store import check_identifier
from schemas.columns import USAGE_COLUMNS, USAGE_SCHEMA

DAY_PREFIX = "d:"
DAY_MS = 86_400_000
# Zones whose days are the UTC days (a DAY/MONTH window in another zone needs minute rows).
UTC_ZONES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Zulu"})
_METER = USAGE_COLUMNS.index("meter_id")
_WINDOW = USAGE_COLUMNS.index("window_start")


def day_meter_id(meter_id: str) -> str:
    """The ``meter_id`` a meter's day rows are stored under."""
    return DAY_PREFIX + meter_id


def day_rows(usage: pa.Table) -> pa.Table:
    """The day rows of a ``USAGE_SCHEMA`` batch: its stream rows of real tenants (not progress
    rows, not backfill rows) with the meter prefixed and the minute floored to its UTC day.
    Rows of one day are not combined here: the table's merges do it (a worker's commit insert
    does not combine rows, ``clickhouse.sink.link_insert_settings``; every read aggregates)."""
    if not usage.num_rows:
        return usage
    keep = pc.and_(pc.equal(usage["origin"], "s"), pc.not_equal(usage["tenant_id"], ""))
    kept = pc.sum(keep).as_py() or 0
    if not kept:
        return usage.slice(0, 0)
    # a worker's link holds stream rows only: no copy then (0.6 ms of a 7,500-row link)
    rows = usage if kept == usage.num_rows else usage.filter(keep)
    meter = pc.binary_join_element_wise(DAY_PREFIX, rows["meter_id"], "")
    day = pc.floor_temporal(rows["window_start"], unit="day")  # the column's zone: UTC
    rows = rows.set_column(_METER, USAGE_SCHEMA.field(_METER), meter)
    return rows.set_column(_WINDOW, USAGE_SCHEMA.field(_WINDOW), day)


def with_day_rows(usage: pa.Table) -> pa.Table:
    """``usage`` followed by its day rows (what one insert into ``usage_minute`` carries)."""
    days = day_rows(usage)
    return pa.concat_tables([usage, days]) if days.num_rows else usage


def day_rows_sql(database: str, where: str = "") -> str:
    """INSERT ... SELECT writing the day rows of the stream's minute rows of ``usage_minute``
    that match ``where`` (`` AND ...``, SQL over the table's columns; '' = all of them). For
    tools and migrations that write minute rows without them; running it twice over the same
    rows counts them twice. Never deduplicated (the table keeps a deduplication log: blocks
    equal to earlier ones, e.g. after those were deleted, would be dropped otherwise)."""
    db = check_identifier(database)
    cols = ", ".join(USAGE_COLUMNS)
    select = ", ".join(
        f"concat('{DAY_PREFIX}', meter_id)"
        if c == "meter_id"
        else "toStartOfDay(window_start)"
        if c == "window_start"
        else c
        for c in USAGE_COLUMNS
    )
    return (
        f"INSERT INTO {db}.usage_minute ({cols}) SELECT {select} FROM {db}.usage_minute "
        f"WHERE origin = 's' AND tenant_id != '' AND NOT startsWith(meter_id, '{DAY_PREFIX}')"
        f"{where} SETTINGS insert_deduplicate = 0"
    )


def whole_days(from_ms: int, to_ms: int) -> tuple[int, int] | None:
    """``[first, end)``: the whole UTC days inside ``[from_ms, to_ms)`` in epoch ms, or None."""
    first = -(-from_ms // DAY_MS) * DAY_MS
    end = to_ms // DAY_MS * DAY_MS
    return (first, end) if first < end else None
