"""Day rows (clickhouse.rollup): the Arrow copy the commit insert carries, the SQL of the
migration and tools, and the whole days of a query's range (no database)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from clickhouse.rollup import (
    DAY_MS,
    day_meter_id,
    day_rows,
    day_rows_sql,
    whole_days,
    with_day_rows,
)
from clickhouse.sink import progress_row
from clickhouse.store import MIGRATIONS_DIR, split_statements
from schemas.columns import USAGE_COLUMNS, UsageRow, usage_rows, usage_table

T0 = datetime(2024, 3, 1, 23, 59, tzinfo=UTC)


def _row(meter: str, minute: datetime, origin: str = "s", tenant: str = "t1") -> UsageRow:
    return UsageRow(
        tenant,
        meter,
        "c1",
        minute,
        '{"r":"eu"}',
        origin,
        {"r": "eu"},
        2,
        2,
        Decimal("1.5"),
        Decimal("0.5"),
        Decimal(1),
        ["u1", "u2"],
        (1709337540000, "e1", Decimal(1)),
        7,
    )


def test_day_rows_floor_the_minute_and_prefix_the_meter() -> None:
    rows = [
        _row("m1", T0),
        _row("m1", datetime(2024, 3, 2, 0, 0, tzinfo=UTC)),
        _row("m2", datetime(1969, 12, 31, 12, 30, tzinfo=UTC)),  # floors down, not to zero
    ]
    got = usage_rows(day_rows(usage_table(rows)))
    assert [(r.meter_id, r.window_start) for r in got] == [
        ("d:m1", datetime(2024, 3, 1, tzinfo=UTC)),
        ("d:m1", datetime(2024, 3, 2, tzinfo=UTC)),
        ("d:m2", datetime(1969, 12, 31, tzinfo=UTC)),
    ]
    # every other column as it was (the store merges them like the minute rows)
    for day, minute in zip(got, rows, strict=True):
        assert day._replace(meter_id=minute.meter_id, window_start=minute.window_start) == minute


def test_only_stream_rows_of_tenants_get_day_rows() -> None:
    """Progress rows (tenant '') and rows of backfill runs ('b:<run>') have none."""
    rows = [
        _row("m1", T0, origin="b:run1"),
        UsageRow(*progress_row("events", 3, 99)),
        _row("m1", T0),
    ]
    got = usage_rows(day_rows(usage_table(rows)))
    assert [(r.tenant_id, r.meter_id, r.origin) for r in got] == [("t1", "d:m1", "s")]
    assert day_rows(usage_table([])).num_rows == 0
    assert day_rows(usage_table(rows[:2])).num_rows == 0


def test_with_day_rows_appends_them_after_the_rows() -> None:
    table = usage_table([_row("m1", T0), _row("m2", T0)])
    both = with_day_rows(table)
    assert both.schema == table.schema
    assert both.slice(0, 2).equals(table)
    assert [r.meter_id for r in usage_rows(both.slice(2))] == ["d:m1", "d:m2"]
    only_progress = usage_table([progress_row("events", 0, 1)])
    assert with_day_rows(only_progress) is only_progress


def test_day_rows_sql_copies_the_stream_rows_once_never_deduplicated() -> None:
    sql = day_rows_sql("tally", " AND tenant_id = 't1'")
    select = ", ".join(
        {"meter_id": "concat('d:', meter_id)", "window_start": "toStartOfDay(window_start)"}.get(
            c, c
        )
        for c in USAGE_COLUMNS
    )
    assert sql == (
        f"INSERT INTO tally.usage_minute ({', '.join(USAGE_COLUMNS)}) SELECT {select} "
        "FROM tally.usage_minute WHERE origin = 's' AND tenant_id != '' "
        "AND NOT startsWith(meter_id, 'd:') AND tenant_id = 't1' "
        "SETTINGS insert_deduplicate = 0"
    )
    assert day_meter_id("abc") == "d:abc"


def test_migration_deletes_day_rows_then_writes_them_with_the_same_sql() -> None:
    """Migration 070 can run again after failing half way: delete first, then the one
    definition of a day row (``day_rows_sql``)."""
    text = (MIGRATIONS_DIR / "070_day_rows.sql").read_text(encoding="utf-8")
    statements = split_statements(text.replace("{db}", "tally"))
    assert statements == [
        "DELETE FROM tally.usage_minute WHERE startsWith(meter_id, 'd:') "
        "SETTINGS mutations_sync = 2",
        day_rows_sql("tally"),
    ]


@given(st.integers(0, 4_000_000_000_000), st.integers(0, 10 * DAY_MS))
def test_whole_days_and_the_edges_partition_the_range(from_ms: int, length: int) -> None:
    to_ms = from_ms + length
    days = whole_days(from_ms, to_ms)
    if days is None:
        # no [k, k + 1) day fits inside the range
        k = -(-from_ms // DAY_MS)
        assert (k + 1) * DAY_MS > to_ms
        return
    first, end = days
    assert first % DAY_MS == 0 and end % DAY_MS == 0
    assert from_ms <= first < end <= to_ms
    # the edges are partial days: less than a whole day on each side
    assert first - from_ms < DAY_MS and to_ms - end < DAY_MS
