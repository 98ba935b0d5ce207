"""`tally meters backfill`: a meter created after its events were stored counts them, once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from clickhouse.repo import Repo
from clickhouse.sink import ClickHouseSink
from clickhouse.usage import run_usage
from schemas.meters import MeterSpec
from schemas.usage import UsageQuery
from streams.backfill import backfill_meter


def _event_row(tenant: str, i: int, ingested: datetime, t: datetime) -> tuple[Any, ...]:
    props = {"gb": i % 7, "region": "eu" if i % 2 else "us"}
    return (
        tenant,
        f"e{i}",
        "upload",
        f"c{i % 3}",
        t,
        orjson.dumps(props).decode(),
        ingested,
        "topic",
        0,
        i,
        0,
    )


def test_backfill_counts_history_once_and_is_repeatable(store: Any) -> None:
    repo = Repo(store)
    tenant, _key = repo.create_tenant("hist")
    other, _ = repo.create_tenant("other")
    sink = ClickHouseSink(store)
    t0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=3)
    ingested = datetime.now(UTC) - timedelta(hours=1)
    rows = [_event_row(tenant.tenant_id, i, ingested, t0 + timedelta(minutes=i)) for i in range(60)]
    rows.append(_event_row(other.tenant_id, 999, ingested, t0))  # another tenant's event
    sink.commit("topic", rows, [], {0: 60})

    meter = repo.create_meter(
        tenant.tenant_id,
        MeterSpec(
            slug="gb",
            event_type="upload",
            aggregation="sum",
            value_property="$.gb",
            group_by={"region": "$.region"},
        ),
    )

    def totals() -> dict[str, Decimal | None]:
        q = UsageQuery(
            tenant_id=tenant.tenant_id,
            meter=meter,
            from_=t0 - timedelta(days=1),
            to=t0 + timedelta(days=2),
            tz="UTC",
            group_by=["customer"],
        )
        return {r.customer or r.group_by.get("customer", ""): r.value for r in run_usage(store, q)}

    assert totals() == {}  # the worker never applies a meter to events stored before it
    expected: dict[str, Decimal] = {}
    for i in range(60):
        expected[f"c{i % 3}"] = expected.get(f"c{i % 3}", Decimal(0)) + i % 7

    first = backfill_meter(sink, meter)
    assert (first.events_scanned, first.events_matched) == (60, 60)
    assert totals() == expected
    second = backfill_meter(sink, meter)  # re-run replaces, never adds
    assert second.run_id != first.run_id
    assert totals() == expected
