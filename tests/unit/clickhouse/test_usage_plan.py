"""Which statements a usage query sends (``clickhouse.usage.usage_values``), given what the
state statement finds: a store double that records the SQL and answers the state statement.
The rows each form returns are checked against the ground truth on chDB in
tests/integration/clickhouse/test_usage.py and the corrections and backfill tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import pytest

from clickhouse.queries import stale_overrides_sql, usage_sql, usage_state_sql
from clickhouse.store import Store
from clickhouse.usage import usage_values
from schemas.meters import Aggregation, Meter
from schemas.usage import UsageQuery

FROM = datetime(2024, 3, 1, tzinfo=UTC)
TO = datetime(2024, 4, 1, tzinfo=UTC)


class Recorder:
    """Answers the state statement with ``(has_run, dirty)``, anything else with no rows."""

    database = "tally"

    def __init__(self, has_run: int, dirty: int) -> None:
        self.state = (has_run, dirty)
        self.sent: list[str] = []

    def query_rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        self.sent.append(sql)
        return [self.state] if len(self.sent) == 1 else []


def _query(aggregation: Aggregation) -> UsageQuery:
    meter = Meter.model_validate(
        dict(
            slug="calls",
            event_type="call",
            aggregation=aggregation,
            value_property=None if aggregation == Aggregation.COUNT else "$.v",
            id="mid",
            tenant_id="t1",
            created_at=FROM,
        )
    )
    return UsageQuery.model_validate(dict(tenant_id="t1", meter=meter, from_=FROM, to=TO))


def _run(aggregation: Aggregation, has_run: int, dirty: int) -> tuple[UsageQuery, list[str]]:
    q = _query(aggregation)
    store = Recorder(has_run, dirty)
    assert usage_values(cast(Store, store), q) == []
    assert store.sent[0] == usage_state_sql(q, "tally")[0]
    return q, store.sent[1:]


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_nothing_but_the_stream_reads_the_minute_rows_alone(aggregation: Aggregation) -> None:
    q, sent = _run(aggregation, has_run=0, dirty=0)
    assert sent == [usage_sql(q, "tally", stream_only=True)[0]]


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_a_complete_backfill_run_keeps_the_full_source(aggregation: Aggregation) -> None:
    q, sent = _run(aggregation, has_run=1, dirty=0)
    # no correction in range: min/max/unique_count/latest need no masks
    assert sent == [usage_sql(q, "tally", overrides=False)[0]]
    assert "usage_backfill" in sent[0]


@pytest.mark.parametrize("aggregation", list(Aggregation))
@pytest.mark.parametrize("has_run", [0, 1])
def test_a_correction_in_range_keeps_the_full_source(
    aggregation: Aggregation, has_run: int
) -> None:
    q, sent = _run(aggregation, has_run=has_run, dirty=3)
    if aggregation in (Aggregation.COUNT, Aggregation.SUM, Aggregation.AVG):
        assert sent == [usage_sql(q, "tally")[0]]
        assert "tally.corrections FINAL" in sent[0]
    else:  # the stale windows are looked up (and repaired) before the query with the masks
        assert sent == [stale_overrides_sql(q, "tally")[0], usage_sql(q, "tally")[0]]
        assert "tally.usage_overrides FINAL" in sent[1]
