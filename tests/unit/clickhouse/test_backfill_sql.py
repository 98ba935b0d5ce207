"""SQL builders of the backfill store: exact text and parameters (no database)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from clickhouse.backfill import (
    backfill_origin_sql,
    boundary_sql,
    checkpoint_row,
    chunk_token,
    count_sql,
    lock_token,
    scan_sql,
)
from schemas.backfill import ALL_OFFSETS, Boundary, Checkpoint
from tally.errors import ValidationError

B = Boundary("tally.events.g2", ("tally.events", "tally.events.g1"), {2: 40, 0: 15})
COND = (
    "(source_topic IN {bf_older:Array(String)} OR (source_topic = {bf_topic:String} "
    "AND source_offset < transform(source_partition, {bf_parts:Array(Int32)}, "
    "{bf_offsets:Array(Int64)}, {bf_all:Int64})))"
)
COND_PARAMS = {
    "bf_older": ["tally.events", "tally.events.g1"],
    "bf_topic": "tally.events.g2",
    "bf_parts": [0, 2],
    "bf_offsets": [15, 40],
    "bf_all": ALL_OFFSETS,
}


def test_boundary_sql() -> None:
    assert boundary_sql(B) == (COND, COND_PARAMS)
    sql, params = boundary_sql(Boundary("t"))
    assert sql == COND
    assert params["bf_older"] == [] and params["bf_parts"] == [] and params["bf_offsets"] == []


def test_scan_sql() -> None:
    sql, params = scan_sql("tally", "t1", "api", B, "ev-9", 500, 7)
    assert sql == (
        "SELECT e.event_id, e.customer, e.t, if(c.action = 'amend', c.props, e.properties), "
        "c.action FROM (SELECT event_id, customer, toUnixTimestamp64Milli(time) AS t, properties "
        "FROM tally.events FINAL "
        "WHERE tenant_id = {tenant:String} AND event_id > {after:String} "
        f"AND event_type = {{type:String}} AND {COND} "
        "ORDER BY event_id LIMIT 1 BY event_id LIMIT {limit:UInt64}) AS e "
        "LEFT JOIN (SELECT event_id, argMax(action, seq) AS action, argMax(properties, seq) AS props "
        "FROM tally.corrections FINAL WHERE tenant_id = {tenant:String} AND meter_id = '' "
        "AND seq >= 1 AND seq <= {cs:UInt64} AND event_id > {after:String} GROUP BY event_id) AS c "
        "ON e.event_id = c.event_id ORDER BY e.event_id"
    )
    assert params == {
        **COND_PARAMS,
        "tenant": "t1",
        "type": "api",
        "after": "ev-9",
        "limit": 500,
        "cs": 7,
    }


def test_count_sql() -> None:
    sql, params = count_sql("db_2", "t1", "api", B)
    assert sql == (
        "SELECT uniqExact(event_id) FROM db_2.events FINAL "
        f"WHERE tenant_id = {{tenant:String}} AND event_type = {{type:String}} AND {COND}"
    )
    assert params == {**COND_PARAMS, "tenant": "t1", "type": "api"}


def test_visible_run_subquery() -> None:
    assert backfill_origin_sql("tally") == (
        "(SELECT concat('b:', argMax(run_id, (finished_at, run_id))) FROM tally.backfill_runs "
        "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} AND state = 'complete')"
    )


@pytest.mark.parametrize("db", ["", "x;DROP", "a b", "1db"])
def test_database_is_validated(db: str) -> None:
    with pytest.raises(ValidationError):
        scan_sql(db, "t1", "api", B, "", 1)
    with pytest.raises(ValidationError):
        backfill_origin_sql(db)


def test_checkpoint_row_and_tokens() -> None:
    row = checkpoint_row("t1", "m1", "r1", Checkpoint(7, "ev-42", 100, 90, 3))
    assert row[:3] == ("t1", "~cp:m1", "")
    assert row[4:6] == ("000000000007", "b:r1")
    assert row[6] == {
        "chunk": "7",
        "last": "ev-42",
        "scanned": "100",
        "matched": "90",
        "problems": "3",
    }
    assert row[7:10] == (0, 0, Decimal(0)) and row[14] == 7
    assert chunk_token("t1", "m1", "r1", 7) == "backfill/t1/m1/r1/7"
    assert chunk_token("t1", "m1", "r1", 8) != chunk_token("t1", "m1", "r2", 7)
    assert lock_token("t1", "m1", 3) == "backfill-lock/t1/m1/3"
