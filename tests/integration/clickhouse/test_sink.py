"""ClickHouseSink on real chDB: commit, progress, atomic part, replay, seen_ids, backfill."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pyarrow as pa

from clickhouse.repo import Repo
from clickhouse.rollup import day_meter_id, day_rows_sql
from clickhouse.sink import EVENTS_COLUMNS, USAGE_COLUMNS, ClickHouseSink, unique_insert_settings
from clickhouse.store import MIGRATIONS_DIR, Store, split_statements
from clickhouse.usage import run_usage
from schemas.columns import events_table, usage_rows, usage_table
from schemas.meters import Aggregation, MeterSpec
from schemas.timeutil import epoch_ms
from schemas.usage import UsageQuery, WindowSize
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
    # + the day rows (clickhouse.rollup), combined by the insert: 1,000 customers x 2 UTC days
    assert parts[0][0] == n + 2 + 2_000 and parts[0][1] == parts[0][2]
    assert sink.progress("topic-a") == {0: 41, 1: 42}


def _day_query(tenant: str, meter: object, window: WindowSize) -> UsageQuery:
    return UsageQuery(
        tenant_id=tenant,
        meter=meter,  # type: ignore[arg-type]
        from_=datetime(2024, 6, 1, tzinfo=UTC),
        to=datetime(2024, 6, 3, tzinfo=UTC),
        window=window,
    )


def _by_window(store: Store, q: UsageQuery) -> list[tuple[datetime, Decimal | None]]:
    return [(r.window_start, r.value) for r in run_usage(store, q)]


def test_a_link_commit_writes_its_day_rows_once(store: Store) -> None:
    """The day rows are part of the link's commit insert: a replay of the link (same token)
    adds neither minute nor day rows; a DAY query (day rows) and an HOUR query (minutes) of
    the same range agree."""
    sink = ClickHouseSink(store)
    tenant, meter = _sum_meter(store)
    rows = [_usage_row(tenant, meter.id, m, v) for m, v in ((0, 5), (700, 7), (725, 11))]
    usage = usage_table(rows)
    for _ in range(3):  # 3 minute rows + their 3 day rows + the progress row, sent each time
        assert sink.commit_link("topic-a", 0, 0, 9, usage) == 7
    count_day_rows = (
        f"SELECT count() FROM {store.database}.usage_minute WHERE meter_id = {{m:String}}",
        {"m": day_meter_id(meter.id)},
    )
    # the insert does not combine rows (link_insert_settings): one day row per minute row
    assert store.query_rows(*count_day_rows) == [(3,)]
    want_days = [
        (datetime(2024, 6, 1, tzinfo=UTC), Decimal(12)),
        (datetime(2024, 6, 2, tzinfo=UTC), Decimal(11)),
    ]
    assert _by_window(store, _day_query(tenant, meter, WindowSize.DAY)) == want_days
    hours = _by_window(store, _day_query(tenant, meter, WindowSize.HOUR))
    assert sum(v for _, v in hours if v is not None) == Decimal(23)
    assert sink.progress("topic-a") == {0: 9}
    # merges combine them: 2024-06-01 (12:00 and 23:40) and 2024-06-02 (00:05); same answers
    store.command(f"OPTIMIZE TABLE {store.database}.usage_minute FINAL")
    assert store.query_rows(*count_day_rows) == [(2,)]
    assert _by_window(store, _day_query(tenant, meter, WindowSize.DAY)) == want_days
    assert sink.progress("topic-a") == {0: 9}


def test_migration_070_writes_the_day_rows_of_older_minute_rows(store: Store) -> None:
    """Minute rows stored by an earlier version (no day rows): the migration writes theirs,
    and running it again after a failure half way (some day rows written) gives the same."""
    sink = ClickHouseSink(store)
    tenant, meter = _sum_meter(store)
    old = usage_table([_usage_row(tenant, meter.id, m, m + 1) for m in range(0, 1500, 50)])
    store.insert_arrow("usage_minute", old, settings=unique_insert_settings())
    q = _day_query(tenant, meter, WindowSize.DAY)
    assert _by_window(store, q) == []  # the day rows are missing
    statements = split_statements((MIGRATIONS_DIR / "070_day_rows.sql").read_text(encoding="utf-8"))
    want = [
        (datetime(2024, 6, 1, tzinfo=UTC), Decimal(sum(m + 1 for m in range(0, 720, 50)))),
        (datetime(2024, 6, 2, tzinfo=UTC), Decimal(sum(m + 1 for m in range(750, 1500, 50)))),
    ]
    for attempt in range(2):
        store.command(statements[0].replace("{db}", store.database))
        if attempt == 0:  # the first attempt fails after writing some of the day rows
            store.command(day_rows_sql(store.database, " AND customer = 'c1'"))
            continue
        store.command(statements[1].replace("{db}", store.database))
        assert _by_window(store, q) == want
    # a link committed after the migration brings its own day rows
    sink.commit_link("topic-a", 0, 0, 0, usage_table([_usage_row(tenant, meter.id, 1, 100)]))
    assert _by_window(store, q)[0] == (want[0][0], want[0][1] + 100)


def test_replayed_events_collapse_with_final(store: Store) -> None:
    sink = ClickHouseSink(store)
    rows = [_event_row("t1", i) for i in range(100)]
    sink.commit("topic-a", rows, [], {0: 99})
    sink.commit("topic-a", rows[50:], [], {0: 99})  # a replay after a crash before step 3
    db = store.database
    assert store.query_rows(f"SELECT count() FROM {db}.events") == [(150,)]
    assert store.query_rows(f"SELECT count() FROM {db}.events FINAL") == [(100,)]


def test_a_usage_batch_of_many_chunks_lands_whole(store: Store) -> None:
    """A link's usage rows come in many Arrow chunks (one per tenant and meter, then the day
    rows); the store sends them as one record batch (Store.insert_arrow): every row and every
    column, maps, arrays and tuples included, lands as it was built, in one part."""
    sink = ClickHouseSink(store)
    tenant, meter = _sum_meter(store)
    chunks = []
    for m in range(6):
        row = _usage_row(tenant, f"{meter.id}-{m}", m, m + 1)
        gv = {"region": f"r{m}"} if m % 2 else {}
        chunks.append(usage_table([(*row[:6], gv, *row[7:])]))
    usage = pa.concat_tables(chunks)
    assert usage.column("group_values").num_chunks == 6
    assert sink.commit_link("topic-a", 0, 0, 5, usage) == 13  # 6 rows, 6 day rows, progress
    db = store.database
    cols = ", ".join(
        "toUnixTimestamp64Milli(window_start)" if c == "window_start" else c for c in USAGE_COLUMNS
    )
    got = store.query_rows(
        f"SELECT {cols} FROM {db}.usage_minute WHERE tenant_id = {{t:String}} "
        "AND NOT startsWith(meter_id, 'd:') ORDER BY meter_id",
        {"t": tenant},
    )
    want = [r._replace(window_start=epoch_ms(r.window_start)) for r in usage_rows(usage)]
    assert [tuple(r[:6]) for r in got] == [tuple(r[:6]) for r in want]
    assert [dict(r[6]) for r in got] == [r.group_values for r in want]
    assert [tuple(r[7:12]) for r in got] == [tuple(r[7:12]) for r in want]
    assert [(list(r[12]), tuple(r[13]), r[14]) for r in got] == [
        (r.uniq_values, r.latest, r.source_offset) for r in want
    ]
    parts = store.query_rows(
        "SELECT count() FROM system.parts WHERE database = {d:String} "
        "AND table = 'usage_minute' AND active",
        {"d": db},
    )
    assert parts == [(1,)]


def test_ledger_insert_keeps_repeated_keys_for_final(store: Store) -> None:
    """The worker's ledger insert does not combine rows of one key (EVENTS_INSERT_SETTINGS):
    a key repeated within one insert stays two rows until a merge, and readers, which use
    FINAL, see it once, as they see a replay that landed in another part."""
    sink = ClickHouseSink(store)
    rows = [_event_row("t1", i) for i in range(5)]
    sink.insert_events(events_table([*rows, rows[2]]))
    db = store.database
    assert store.query_rows(f"SELECT count() FROM {db}.events") == [(6,)]
    assert store.query_rows(f"SELECT count() FROM {db}.events FINAL") == [(5,)]
    sink.insert_events(events_table(rows[:2]))  # a replay of part of it
    assert store.query_rows(f"SELECT count() FROM {db}.events FINAL") == [(5,)]
    store.command(f"OPTIMIZE TABLE {db}.events FINAL")
    assert store.query_rows(f"SELECT count() FROM {db}.events") == [(5,)]


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
