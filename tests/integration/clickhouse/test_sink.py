"""ClickHouseSink on real chDB: commit, progress, atomic part, replay, seen_ids, backfill."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson

from clickhouse.repo import Repo
from clickhouse.sink import EVENTS_COLUMNS, USAGE_COLUMNS, ClickHouseSink
from clickhouse.store import Store
from clickhouse.usage import run_usage
from schemas.meters import Aggregation, MeterSpec
from schemas.timeutil import epoch_ms
from schemas.usage import UsageQuery
from streams.sink import Sink

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def _event_row(
    tenant: str,
    i: int,
    partition: int = 0,
    offset: int | None = None,
    ingested: datetime = T0,
    etype: str = "api_call",
) -> tuple:
    return (
        tenant,
        f"id-{i:06d}",
        etype,
        f"c{i % 3}",
        T0 + timedelta(seconds=i),
        orjson.dumps({"v": i, "k": "x"}).decode(),
        ingested,
        "topic-a",
        partition,
        i if offset is None else offset,
        i % 7,
    )


def _usage_row(tenant: str, meter: str, minute: int, value: int) -> tuple:
    return (
        tenant,
        meter,
        "c1",
        T0 + timedelta(minutes=minute),
        "",
        "s",
        {},
        1,
        1,
        Decimal(value),
        Decimal(value),
        Decimal(value),
        [str(value)],
        (epoch_ms(T0) + minute * 60_000, f"e{minute}", Decimal(value)),
        0,
    )


def _sum_meter(store: Store) -> tuple[str, object]:
    repo = Repo(store)
    t, _ = repo.create_tenant("acme")
    meter = repo.create_meter(
        t.tenant_id,
        MeterSpec(
            slug="m", event_type="api_call", aggregation=Aggregation.SUM, value_property="$.v"
        ),
    )
    return t.tenant_id, meter


def _total(store: Store, tenant: str, meter: object) -> Decimal | None:
    q = UsageQuery(
        tenant_id=tenant,
        meter=meter,
        from_=T0 - timedelta(days=1),  # type: ignore[arg-type]
        to=T0 + timedelta(days=1),
    )
    rows = run_usage(store, q)
    return rows[0].value if rows else None


def test_columns_match_the_tables(store: Store) -> None:
    for table, cols in (("events", EVENTS_COLUMNS), ("usage_minute", USAGE_COLUMNS)):
        rows = store.query_rows(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} "
            "ORDER BY position",
            {"db": store.database, "t": table},
        )
        assert [r[0] for r in rows] == cols
    assert isinstance(ClickHouseSink(store), Sink)


def test_commit_then_progress(store: Store) -> None:
    sink = ClickHouseSink(store)
    tenant, meter = _sum_meter(store)
    assert sink.progress("topic-a") == {}
    sink.commit(
        "topic-a",
        [_event_row(tenant, i) for i in range(5)],
        [_usage_row(tenant, meter.id, 0, 10)],
        {0: 4, 3: 17},
    )  # type: ignore[attr-defined]
    assert sink.progress("topic-a") == {0: 4, 3: 17}
    sink.commit("topic-a", [], [], {0: 9})
    sink.commit("topic-b", [], [], {0: 100})
    assert sink.progress("topic-a") == {0: 9, 3: 17}
    assert sink.progress("topic-b") == {0: 100}
    assert _total(store, tenant, meter) == Decimal(10)
    n = store.query_rows(f"SELECT count() FROM {store.database}.events FINAL")
    assert n == [(5,)]
    # stored events read back with aware times and the same content
    (row,) = store.query_rows(
        f"SELECT {', '.join(EVENTS_COLUMNS)} FROM {store.database}.events FINAL WHERE event_id = 'id-000003'"
    )
    want = _event_row(tenant, 3)
    assert row[:4] == want[:4] and row[5] == want[5] and row[7:] == want[7:]
    assert row[4].replace(tzinfo=UTC) == want[4]


def test_commit_is_one_part(store: Store) -> None:
    """More rows than the server's default squashing threshold (~1M rows): still one part."""
    sink = ClickHouseSink(store)
    store.command(f"SYSTEM STOP MERGES {store.database}.usage_minute")
    n = 1_100_000
    base = (Decimal(1), Decimal(1), Decimal(1), ["x"], (1, "e", Decimal(1)), 0)
    rows = [
        ("t", "m", f"c{i % 1000}", T0 + timedelta(minutes=i // 1000), "", "s", {}, 1, 1, *base)
        for i in range(n)
    ]
    sink.commit("topic-a", [], rows, {0: 41, 1: 42})
    parts = store.query_rows(
        "SELECT rows, min_block_number, max_block_number FROM system.parts "
        "WHERE database = {db:String} AND table = 'usage_minute' AND active",
        {"db": store.database},
    )
    assert len(parts) == 1, parts
    assert parts[0][0] == n + 2 and parts[0][1] == parts[0][2]
    assert sink.progress("topic-a") == {0: 41, 1: 42}


def test_replayed_events_collapse_with_final(store: Store) -> None:
    sink = ClickHouseSink(store)
    rows = [_event_row("t1", i) for i in range(100)]
    sink.commit("topic-a", rows, [], {0: 99})
    sink.commit("topic-a", rows[50:], [], {0: 99})  # a replay after a crash before step 3
    db = store.database
    assert store.query_rows(f"SELECT count() FROM {db}.events") == [(150,)]
    assert store.query_rows(f"SELECT count() FROM {db}.events FINAL") == [(100,)]


def test_seen_ids(store: Store) -> None:
    sink = ClickHouseSink(store)
    old = T0 - timedelta(days=40)
    rows = [_event_row("t1", i, partition=i % 2, offset=i) for i in range(20)]
    rows += [_event_row("t2", 100 + i, partition=0, offset=20 + i) for i in range(4)]
    rows += [_event_row("t1", 200, partition=0, offset=30, ingested=old)]
    rows += [_event_row("t1", 300, partition=0, offset=10)]
    rows[-1] = (*rows[-1][:7], "other-topic", *rows[-1][8:])
    sink.commit("topic-a", rows, [], {})
    got = [
        x
        for chunk in sink.seen_ids("topic-a", 0, 3, 30, epoch_ms(T0 - timedelta(days=35)))
        for x in chunk
    ]
    want = {("t1", f"id-{i:06d}") for i in range(4, 20, 2)} | {
        ("t2", f"id-{100 + i:06d}") for i in range(4)
    }
    assert sorted(got) == sorted(want)
    assert all(isinstance(c, list) for c in sink.seen_ids("topic-a", 0, -1, 100, 0))
    assert list(sink.seen_ids("topic-a", 5, -1, 100, 0)) == []
