"""Exact SQL text and parameters of usage queries (no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clickhouse.queries import VALUE_SQL, WINDOW_SQL, usage_sql, usage_state_sql
from schemas.meters import Aggregation, Meter
from schemas.usage import UsageQuery, UsageRow, WindowSize
from tally.errors import ValidationError

FROM = datetime(2024, 3, 1, tzinfo=UTC)
TO = datetime(2024, 4, 1, tzinfo=UTC)
FROM_MS = 1709251200000
TO_MS = 1711929600000
# the stream's rows plus only the meter's latest complete backfill run
VISIBLE_RUN = (
    "(SELECT concat('b:', argMax(run_id, (finished_at, run_id))) FROM tally.backfill_runs"
    " WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} AND state = 'complete')"
)
VISIBLE_SEQ = (
    "(SELECT argMax(corrections_seq, (finished_at, run_id)) FROM tally.backfill_runs"
    " WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} AND state = 'complete')"
)
COLUMNS = (
    "tenant_id, meter_id, customer, window_start, group_key, group_values,"
    " toInt64(events) AS events, toInt64(value_count) AS value_count, value_sum, value_min,"
    " value_max, uniq_values, latest"
)
DELTAS = (
    "tenant_id, meter_id, customer, window_start, group_key, group_values, events, value_count,"
    " value_sum, CAST(NULL AS Nullable(Decimal(38, 9))) AS value_min,"
    " CAST(NULL AS Nullable(Decimal(38, 9))) AS value_max, CAST([] AS Array(String)) AS uniq_values,"
    " CAST((0, '', 0) AS Tuple(Int64, String, Decimal(38, 9))) AS latest"
)
KEY = "tenant_id = {tenant:String} AND meter_id = {meter:String}"
# count/sum/avg: the stream's rows, the meter's latest complete backfill run, and the effect rows
# of corrections (side 's'; side 'b' only above the corrections the visible run applied itself)
SOURCE = (
    f"(SELECT {COLUMNS} FROM tally.usage_minute WHERE {KEY}"
    f" AND origin IN ('s', {VISIBLE_RUN})"
    f" UNION ALL SELECT {COLUMNS} FROM tally.usage_backfill WHERE {KEY}"
    f" AND origin = {VISIBLE_RUN}"
    f" UNION ALL SELECT {DELTAS} FROM tally.corrections FINAL WHERE {KEY}"
    f" AND (side = 's' OR (side = 'b' AND {VISIBLE_RUN} != 'b:' AND seq > {VISIBLE_SEQ})))"
)
# min/max/unique_count/latest: windows with an override are read from usage_overrides instead
# (the recomputed windows are looked up in the query's range only)
NARROW = (
    " AND window_start >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')"
    " AND window_start < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')"
)
MASK_S = (
    f"(SELECT customer, window_start, group_key FROM tally.usage_overrides WHERE {KEY}{NARROW}"
    " AND side = 's')"
)
MASK_B = (
    f"(SELECT customer, window_start, group_key FROM tally.usage_overrides WHERE {KEY}{NARROW}"
    f" AND side = 'b' AND seq > {VISIBLE_SEQ})"
)
OVERRIDDEN = f"(SELECT DISTINCT customer FROM tally.usage_overrides WHERE {KEY}{NARROW})"
OVERRIDDEN_SOURCE = (
    f"(SELECT {COLUMNS} FROM tally.usage_minute WHERE {KEY}"
    f" AND origin IN ('s', {VISIBLE_RUN}) AND customer NOT IN {OVERRIDDEN}"
    f" UNION ALL SELECT {COLUMNS} FROM tally.usage_backfill WHERE {KEY}"
    f" AND origin = {VISIBLE_RUN} AND customer NOT IN {OVERRIDDEN}"
    f" UNION ALL SELECT {COLUMNS} FROM tally.usage_minute WHERE {KEY}"
    f" AND origin IN ('s', {VISIBLE_RUN}) AND customer IN {OVERRIDDEN} AND NOT ((origin = 's'"
    f" AND (customer, window_start, group_key) IN {MASK_S}) OR (origin != 's'"
    f" AND (customer, window_start, group_key) IN {MASK_B}))"
    f" UNION ALL SELECT {COLUMNS} FROM tally.usage_backfill WHERE {KEY}"
    f" AND origin = {VISIBLE_RUN} AND customer IN {OVERRIDDEN}"
    f" AND (customer, window_start, group_key) NOT IN {MASK_B}"
    f" UNION ALL SELECT {COLUMNS} FROM tally.usage_overrides FINAL WHERE {KEY}"
    f" AND (side = 's' OR (side = 'b' AND {VISIBLE_RUN} != 'b:' AND seq > {VISIBLE_SEQ})))"
)
# ... and without any corrected window in range: the pre-aggregates alone
PLAIN_SOURCE = (
    f"(SELECT {COLUMNS} FROM tally.usage_minute WHERE {KEY}"
    f" AND origin IN ('s', {VISIBLE_RUN})"
    f" UNION ALL SELECT {COLUMNS} FROM tally.usage_backfill WHERE {KEY}"
    f" AND origin = {VISIBLE_RUN})"
)
RANGE = (
    " WHERE tenant_id = {tenant:String} AND meter_id = {meter:String}"
    " AND window_start >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')"
    " AND window_start < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')"
)
WHERE = f" FROM {SOURCE}" + RANGE
OVERRIDDEN_WHERE = f" FROM {OVERRIDDEN_SOURCE}" + RANGE
ADDITIVE = {Aggregation.COUNT, Aggregation.SUM, Aggregation.AVG}
BASE_PARAMS = {"tenant": "t1", "meter": "mid", "from_ms": FROM_MS, "to_ms": TO_MS}


def meter(aggregation: Aggregation = Aggregation.SUM, **kw: object) -> Meter:
    data: dict[str, object] = dict(
        slug="calls",
        event_type="call",
        aggregation=aggregation,
        value_property=None if aggregation == Aggregation.COUNT else "$.v",
        group_by={"region": "$.r", "tier": "$.t"},
        id="mid",
        tenant_id="t1",
        created_at=FROM,
    )
    data.update(kw)
    return Meter.model_validate(data)


def query(**kw: object) -> UsageQuery:
    data: dict[str, object] = dict(tenant_id="t1", meter=meter(), from_=FROM, to=TO)
    data.update(kw)
    return UsageQuery.model_validate(data)


EXPECTED_VALUE = {
    Aggregation.COUNT: "sum(events)",
    Aggregation.SUM: "sum(toDecimal256(value_sum, 9))",
    Aggregation.MIN: "min(value_min)",
    Aggregation.MAX: "max(value_max)",
    Aggregation.AVG: "sum(toDecimal256(value_sum, 9)) / nullIf(sum(value_count), 0)",
    Aggregation.UNIQUE_COUNT: "uniqExactArray(uniq_values)",
    Aggregation.LATEST: (
        "if(tupleElement(max(latest), 2) = '', NULL, tupleElement(max(latest), 3))"
    ),
}


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_each_aggregation_whole_range(aggregation: Aggregation) -> None:
    sql, params = usage_sql(query(meter=meter(aggregation)), "tally")
    if aggregation in ADDITIVE:
        tail = WHERE + " GROUP BY tenant_id"
    else:  # a group whose every window lost its events to corrections has no row
        tail = OVERRIDDEN_WHERE + " GROUP BY tenant_id HAVING sum(events) > 0"
    assert sql == f"SELECT {EXPECTED_VALUE[aggregation]} AS value" + tail
    plain, _ = usage_sql(query(meter=meter(aggregation)), "tally", overrides=False)
    if aggregation not in ADDITIVE:
        assert plain == (
            f"SELECT {EXPECTED_VALUE[aggregation]} AS value FROM {PLAIN_SOURCE}"
            + RANGE
            + " GROUP BY tenant_id HAVING sum(events) > 0"
        )
    else:
        assert plain == sql  # count/sum/avg: the deltas are always part of the source
    assert params == BASE_PARAMS
    assert VALUE_SQL[aggregation] == EXPECTED_VALUE[aggregation]


# the whole UTC days [day_from, day_to) from the meter's day rows, the rest from its minutes
DAYS_AND_EDGES = (
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
# the minute rows of the range
MINUTES = (
    "meter_id = {meter:String} AND origin = 's'"
    " AND window_start >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')"
    " AND window_start < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')"
)


@pytest.mark.parametrize("aggregation", list(Aggregation))
@pytest.mark.parametrize("window", [WindowSize.HOUR, WindowSize.DAY])
def test_stream_only_reads_the_stream_rows_straight(
    aggregation: Aggregation, window: WindowSize
) -> None:
    """No complete run, no correction in range: the stream's rows of usage_minute alone, with
    every filter of the full query and no backfill or corrections branch. HOUR windows read
    the minute rows; DAY windows in UTC the whole days of the range from the day rows (meter
    'd:<id>') and the partial days at its edges from the minute rows."""
    q = query(
        meter=meter(aggregation),
        from_=FROM + timedelta(hours=5, minutes=1),
        to=TO - timedelta(minutes=7),
        window=window,
        customers=["c1"],
        group_by=["region"],
        filters={"tier": ["gold"]},
        by_customer=True,
    )
    sql, params = usage_sql(q, "tally", stream_only=True)
    having = "" if aggregation in ADDITIVE else " HAVING sum(events) > 0"
    start, end = WINDOW_SQL[window]
    rows = MINUTES if window is WindowSize.HOUR else f"origin = 's' AND {DAYS_AND_EDGES}"
    assert sql == (
        f"SELECT {start} AS bucket, toUnixTimestamp(bucket) AS window_start_s,"
        f" toUnixTimestamp({end}) AS window_end_s, customer,"
        f" group_values[{{g0:String}}] AS d0, {EXPECTED_VALUE[aggregation]} AS value"
        f" FROM tally.usage_minute WHERE tenant_id = {{tenant:String}} AND {rows}"
        " AND customer IN {customers:Array(String)}"
        " AND group_values[{fk0:String}] IN {f0:Array(String)}"
        f" GROUP BY bucket, customer, d0{having} ORDER BY bucket, customer, d0"
    )
    _, full_params = usage_sql(q, "tally")
    if window is WindowSize.HOUR:
        assert params == full_params  # the same parameters, only the source differs
    else:
        assert params == {
            **full_params,
            "day_meter": "d:mid",
            "day_from_ms": FROM_MS + 86_400_000,  # 2024-03-02: the first whole day
            "day_to_ms": TO_MS - 86_400_000,  # 2024-03-31: the last whole day ends there
        }
    assert "backfill" not in sql and "corrections" not in sql and "overrides" not in sql


@pytest.mark.parametrize(
    ("window", "tz", "from_", "to", "days"),
    [
        (WindowSize.DAY, "UTC", FROM, TO, (FROM_MS, TO_MS)),
        (WindowSize.MONTH, "Etc/UTC", FROM, TO, (FROM_MS, TO_MS)),
        (None, "Europe/Paris", FROM, TO, (FROM_MS, TO_MS)),  # no bucket: one range
        (WindowSize.DAY, "Europe/Paris", FROM, TO, None),  # Paris days are not UTC days
        (WindowSize.MONTH, "America/New_York", FROM, TO, None),
        (WindowSize.HOUR, "UTC", FROM, TO, None),
        (WindowSize.MINUTE, "UTC", FROM, TO, None),
        # no whole UTC day inside the range
        (None, "UTC", FROM + timedelta(hours=1), FROM + timedelta(days=1, hours=1), None),
        (WindowSize.DAY, "UTC", FROM, FROM + timedelta(hours=23), None),
        # exactly one
        (None, "UTC", FROM, FROM + timedelta(days=1), (FROM_MS, FROM_MS + 86_400_000)),
    ],
)
def test_which_queries_read_day_rows(
    window: WindowSize | None,
    tz: str,
    from_: datetime,
    to: datetime,
    days: tuple[int, int] | None,
) -> None:
    q = query(window=window, tz=tz, from_=from_, to=to)
    sql, params = usage_sql(q, "tally", stream_only=True)
    if days is None:
        assert "day_meter" not in params and "day_meter" not in sql
        assert MINUTES in sql
    else:
        assert (params["day_from_ms"], params["day_to_ms"]) == days
        assert DAYS_AND_EDGES in sql
    # the full source (a backfill run or a correction applies) never reads day rows
    full, full_params = usage_sql(q, "tally")
    assert "day_meter" not in full and "day_meter" not in full_params


def test_state_statement_reads_the_visible_run_and_counts_corrections_in_range() -> None:
    sql, params = usage_state_sql(query(customers=["c1", "c2"]), "tally")
    # the same visible run the full source reads ('b:' = none)
    assert sql == (
        f"SELECT {VISIBLE_RUN} != 'b:',"
        " (SELECT count() FROM tally.corrections WHERE tenant_id = {tenant:String}"
        " AND meter_id = {meter:String}"
        " AND window_start >= fromUnixTimestamp64Milli({from_ms:Int64}, 'UTC')"
        " AND window_start < fromUnixTimestamp64Milli({to_ms:Int64}, 'UTC')"
        " AND customer IN {stale_customers:Array(String)})"
    )
    assert params == {**BASE_PARAMS, "stale_customers": ["c1", "c2"]}
    whole, whole_params = usage_state_sql(query(), "tally")
    assert "customer IN" not in whole and whole_params == BASE_PARAMS


def test_minute_window_needs_no_tz() -> None:
    sql, params = usage_sql(query(window=WindowSize.MINUTE, tz="Asia/Kolkata"), "tally")
    assert sql == (
        "SELECT toStartOfMinute(window_start) AS bucket, toUnixTimestamp(bucket) AS window_start_s,"
        " toUnixTimestamp(bucket + toIntervalMinute(1)) AS window_end_s, sum(toDecimal256(value_sum, 9)) AS value"
        + WHERE
        + " GROUP BY bucket ORDER BY bucket"
    )
    assert params == BASE_PARAMS


def test_hour_window_in_half_hour_zone() -> None:
    sql, params = usage_sql(query(window=WindowSize.HOUR, tz="Australia/Lord_Howe"), "tally")
    assert sql == (
        "SELECT arrayFirst(x -> toMinute(x, {tz:String}) = 0, arrayMap(k -> "
        "toStartOfFifteenMinutes(window_start) - toIntervalMinute(15 * k), range(9))) AS bucket,"
        " toUnixTimestamp(bucket) AS window_start_s,"
        " toUnixTimestamp(arrayFirst(x -> toMinute(x, {tz:String}) = 0, arrayMap(k -> bucket"
        " + toIntervalMinute(15 * k), range(1, 10)))) AS window_end_s, sum(toDecimal256(value_sum, 9)) AS value"
        + WHERE
        + " GROUP BY bucket ORDER BY bucket"
    )
    assert params == {**BASE_PARAMS, "tz": "Australia/Lord_Howe"}


def test_day_window() -> None:
    sql, params = usage_sql(query(window=WindowSize.DAY, tz="Europe/Berlin"), "tally")
    assert sql == (
        "SELECT toStartOfInterval(window_start, INTERVAL 1 DAY, {tz:String}) AS bucket,"
        " toUnixTimestamp(bucket) AS window_start_s,"
        " toUnixTimestamp(toStartOfInterval(bucket + INTERVAL 1 DAY, INTERVAL 1 DAY, {tz:String}))"
        " AS window_end_s, sum(toDecimal256(value_sum, 9)) AS value"
        + WHERE
        + " GROUP BY bucket ORDER BY bucket"
    )
    assert params == {**BASE_PARAMS, "tz": "Europe/Berlin"}


def test_month_window() -> None:
    sql, params = usage_sql(query(window=WindowSize.MONTH, tz="America/New_York"), "tally")
    assert sql == (
        "SELECT toDateTime(toStartOfInterval(window_start, INTERVAL 1 MONTH, {tz:String}),"
        " {tz:String}) AS bucket, toUnixTimestamp(bucket) AS window_start_s,"
        " toUnixTimestamp(bucket + INTERVAL 1 MONTH) AS window_end_s, sum(toDecimal256(value_sum, 9)) AS value"
        + WHERE
        + " GROUP BY bucket ORDER BY bucket"
    )
    assert params == {**BASE_PARAMS, "tz": "America/New_York"}


def test_group_by_customer_dimensions_and_filters() -> None:
    q = query(
        meter=meter(Aggregation.COUNT),
        window=WindowSize.DAY,
        customers=["c1", "c2", "c1"],
        group_by=["tier", "customer", "region"],
        filters={"tier": ["a", "b"], "customer": ["c2"]},
    )
    sql, params = usage_sql(q, "db_1")
    assert sql == (
        "SELECT toStartOfInterval(window_start, INTERVAL 1 DAY, {tz:String}) AS bucket,"
        " toUnixTimestamp(bucket) AS window_start_s,"
        " toUnixTimestamp(toStartOfInterval(bucket + INTERVAL 1 DAY, INTERVAL 1 DAY, {tz:String}))"
        " AS window_end_s, customer, group_values[{g0:String}] AS d0,"
        " group_values[{g1:String}] AS d1, sum(events) AS value"
        + WHERE.replace("tally.", "db_1.")
        + " AND customer IN {customers:Array(String)}"
        " AND customer IN {f0:Array(String)}"
        " AND group_values[{fk1:String}] IN {f1:Array(String)}"
        " GROUP BY bucket, customer, d0, d1 ORDER BY bucket, customer, d0, d1"
    )
    assert params == {
        **BASE_PARAMS,
        "tz": "UTC",
        "g0": "tier",
        "g1": "region",
        "customers": ["c1", "c2"],
        "f0": ["c2"],
        "f1": ["a", "b"],
        "fk1": "tier",
    }


def test_by_customer_flag_without_window() -> None:
    sql, params = usage_sql(query(by_customer=True, group_by=["region"]), "tally")
    assert sql == (
        "SELECT customer, group_values[{g0:String}] AS d0, sum(toDecimal256(value_sum, 9)) AS value"
        + WHERE
        + " GROUP BY customer, d0 ORDER BY customer, d0"
    )
    assert params == {**BASE_PARAMS, "g0": "region"}


def test_values_never_spliced_into_sql() -> None:
    evil = "x' OR 1=1 --"
    q = query(customers=[evil], filters={"region": [evil]}, group_by=["region"])
    sql, params = usage_sql(q, "tally")
    assert evil not in sql and "OR 1=1" not in sql
    assert params["customers"] == [evil] and params["f0"] == [evil]


@pytest.mark.parametrize("db", ["", "a.b", "x; DROP TABLE y", "1abc", "a-b"])
def test_database_identifier_validated(db: str) -> None:
    with pytest.raises(ValidationError) as ei:
        usage_sql(query(), db)
    assert [d["field"] for d in ei.value.details] == ["database"]


def test_every_window_has_sql() -> None:
    assert set(WINDOW_SQL) == set(WindowSize)


# --- validation ------------------------------------------------------------------------------


def _field(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return str(exc.value.details[0]["field"])


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"group_by": ["nope"]}, "group_by"),
        ({"group_by": ["region", "customerx"]}, "group_by"),
        ({"filters": {"nope": ["a"]}}, "filters"),
        ({"filters": {"region": []}}, "filters.region"),
        ({"from_": FROM + timedelta(seconds=30)}, "from"),
        ({"from_": FROM + timedelta(milliseconds=1)}, "from"),
        ({"to": TO - timedelta(microseconds=1)}, "to"),
        ({"from_": datetime(2024, 3, 1)}, "from"),
        ({"to": datetime(2024, 4, 1)}, "to"),
        ({"to": FROM}, "from"),
        ({"from_": TO, "to": FROM}, "from"),
        ({"tz": "Mars/Olympus"}, "tz"),
        ({"tz": "../../etc/passwd"}, "tz"),
        ({"tz": ""}, "tz"),
        ({"tenant_id": "other"}, "meter"),
    ],
)
def test_validation_errors_name_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as ei:
        query(**kw)
    assert _field(ei) == field
    assert field.split(".")[0] in ei.value.message


def test_accepts_aliases_offsets_and_dedupes() -> None:
    q = UsageQuery.model_validate(
        {
            "tenant_id": "t1",
            "meter": meter(),
            "from": datetime(2024, 3, 1, 5, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            "to": TO,
            "window": "HOUR",
            "group_by": ["region", "region", "customer"],
        }
    )
    assert q.from_ == FROM and q.from_.tzinfo == UTC
    assert q.window is WindowSize.HOUR
    assert q.group_by == ["region", "customer"]
    assert q.dimensions == ["region"] and q.per_customer


def test_usage_row_defaults() -> None:
    r = UsageRow(window_start=FROM, window_end=TO)
    assert r.customer is None and r.group_by == {} and r.value is None


@given(
    dims=st.lists(st.sampled_from(["region", "tier", "customer"]), max_size=5),
    window=st.sampled_from([None, *WindowSize]),
    aggregation=st.sampled_from(list(Aggregation)),
    stream_only=st.booleans(),
)
def test_sql_shape_invariants(
    dims: list[str], window: WindowSize | None, aggregation: Aggregation, stream_only: bool
) -> None:
    q = query(meter=meter(aggregation), group_by=dims, window=window)
    sql, params = usage_sql(q, "tally", stream_only=stream_only)
    # always scoped to the tenant and meter (or its day rows and minutes), and only ever reads
    # the pre-aggregates (with the corrections' effect rows or recomputed windows), never the
    # ledger
    assert (
        "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String}" in sql
        or f"WHERE tenant_id = {{tenant:String}} AND origin = 's' AND {DAYS_AND_EDGES}" in sql
    )
    assert " FROM tally.usage_minute " in sql and "tally.events" not in sql
    assert params["tenant"] == "t1" and params["meter"] == "mid"
    assert params.get("day_meter", "d:mid") == "d:mid"
    # every {name:Type} placeholder has a parameter and vice versa
    import re

    names = set(re.findall(r"\{(\w+):", sql))
    assert names == set(params)
    n_keys = (window is not None) + len(dict.fromkeys(dims))
    assert sql.count(" AS d") == len([d for d in dict.fromkeys(dims) if d != "customer"])
    if n_keys:
        group = sql.split(" GROUP BY ")[-1].split(" ORDER BY ")[0].split(" HAVING ")[0]
        assert sql.endswith(" ORDER BY " + group)
