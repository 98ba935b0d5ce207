"""BackfillStore on real chDB: the scan matches the boundary predicate, chunks and lock rows are
deduplicated by their tokens, and usage queries read only the latest complete run."""

from __future__ import annotations

import threading
from dataclasses import replace
from decimal import Decimal

from clickhouse.backfill import BackfillStore, checkpoint_meter
from clickhouse.sink import ONE_PART_SETTINGS, USAGE_COLUMNS
from clickhouse.store import Store
from schemas.backfill import COMPLETE, RUNNING, Checkpoint, LockRow, RunRecord
from streams.backfill import make_boundary
from tests.integration.streams.history import T0, TYPE, make_history


def _usage(tenant: str, meter: str, origin: str, value: int, customer: str = "c1") -> tuple:
    return (
        tenant,
        meter,
        customer,
        T0,
        "",
        origin,
        {},
        1,
        1,
        Decimal(value),
        Decimal(value),
        Decimal(value),
        [],
        (0, "", Decimal(0)),
        0,
    )


def test_scan_is_the_boundary_predicate_and_pages_stably(store: Store) -> None:
    h = make_history(store, n=400)
    bs = BackfillStore(store)
    assert bs.activation_offsets(h.tenant, h.meter.id, h.topic) == h.markers
    topics = bs.ledger_topics(h.tenant, TYPE)
    assert topics == sorted({e.topic for e in h.events})
    boundary = make_boundary(h.topic, topics, h.markers)
    want = sorted(e.event_id for e in h.backfill_side())
    assert want and len(want) < len(h.events)  # both sides are populated
    assert all(boundary.includes(e.topic, e.partition, e.offset) for e in h.backfill_side())
    assert bs.count_events(h.tenant, TYPE, boundary) == len(want)
    got: list[str] = []
    after = ""
    while True:
        page = bs.scan_events(h.tenant, TYPE, boundary, after, 37)
        got += [e[0] for e in page]
        if len(page) < 37:
            break
        after = page[-1][0]
    assert got == want  # each once, in id order, nothing of the other tenant or type
    first = next(e for e in h.events if e.event_id == want[0])
    (row,) = bs.scan_events(h.tenant, TYPE, boundary, "", 1)
    assert row == (first.event_id, first.customer, int(first.time.timestamp() * 1000), first.props)


def test_a_chunk_sent_twice_is_stored_once(store: Store) -> None:
    bs = BackfillStore(store)
    rows = [_usage("t1", "m1", "b:r1", v, f"c{v}") for v in range(1, 4)]
    cp = Checkpoint(1, "e9", 3, 3, 0)
    bs.write_chunk("t1", "m1", "r1", rows, cp)
    bs.write_chunk("t1", "m1", "r1", rows, cp)  # a resumed run re-sends it
    bs.write_chunk("t1", "m1", "r1", rows[:1], Checkpoint(2, "e10", 1, 1, 0))
    (total,) = store.query_rows(
        f"SELECT sum(value_sum) FROM {store.database}.usage_backfill "
        "WHERE tenant_id = 't1' AND meter_id = 'm1'"
    )[0]
    assert Decimal(total) == 1 + 2 + 3 + 1
    assert bs.checkpoints("t1", "m1", "r1") == [cp, Checkpoint(2, "e10", 1, 1, 0)]
    assert bs.count_windows("t1", "m1", "r1") == 3
    assert bs.checkpoints("t1", "m1", "other") == []


def test_lock_rows_keep_one_winner_per_seq_even_when_inserted_at_once(store: Store) -> None:
    bs = BackfillStore(store)
    barrier = threading.Barrier(6)

    def contend(i: int) -> None:
        barrier.wait()
        bs.insert_lock(LockRow("t1", "m1", 1, f"run{i}", f"owner{i}", 1_000 + i))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rows = store.query_rows(
        f"SELECT owner FROM {store.database}.backfill_locks WHERE tenant_id = 't1' AND seq = 1"
    )
    assert len(rows) == 1  # the store kept exactly one
    winner = bs.lock_at("t1", "m1", 1)
    assert winner is not None and winner.owner == rows[0][0]
    assert bs.lock_head("t1", "m1") == winner
    bs.insert_lock(LockRow("t1", "m1", 2, "runX", "ownerX", 5_000))
    head = bs.lock_head("t1", "m1")
    assert head is not None and (head.seq, head.owner) == (2, "ownerX")


def test_queries_read_only_the_latest_complete_run(store: Store) -> None:
    h = make_history(store, n=40)
    bs = BackfillStore(store)
    t, m = h.tenant, h.meter.id
    stream = sum(h.totals().values(), Decimal(0))
    run = RunRecord(t, m, "r1", state=RUNNING, started_ms=1, heartbeat_ms=1, version=1)
    bs.save_run(run)
    bs.write_chunk(t, m, "r1", [_usage(t, m, "b:r1", 100)], Checkpoint(1, "x", 1, 1, 0))
    assert sum(h.totals().values(), Decimal(0)) == stream  # running: invisible
    assert bs.visible_run(t, m) is None
    bs.save_run(replace(run, state=COMPLETE, finished_ms=10, version=2))
    assert sum(h.totals().values(), Decimal(0)) == stream + 100
    # a late heartbeat of a finished run does not hide it (any 'complete' row counts)
    bs.save_run(replace(run, state=RUNNING, heartbeat_ms=11, version=3))
    assert bs.visible_run(t, m) == "r1" and bs.get_run(t, m, "r1").state == COMPLETE  # type: ignore[union-attr]
    run2 = RunRecord(t, m, "r2", state=RUNNING, started_ms=20, heartbeat_ms=20, version=1)
    bs.save_run(run2)
    bs.write_chunk(t, m, "r2", [_usage(t, m, "b:r2", 7)], Checkpoint(1, "x", 1, 1, 0))
    assert sum(h.totals().values(), Decimal(0)) == stream + 100
    bs.save_run(replace(run2, state=COMPLETE, finished_ms=30, version=2))
    assert sum(h.totals().values(), Decimal(0)) == stream + 7  # the swap, in one step
    assert [r.run_id for r in bs.list_runs(t, m)] == ["r1", "r2"]
    bs.retire_runs(t, m, "r2")
    origins = store.query_rows(
        f"SELECT DISTINCT meter_id, origin FROM {store.database}.usage_backfill "
        "WHERE tenant_id = {t:String}",
        {"t": t},
    )
    assert sorted(origins) == [(m, "b:r2"), (checkpoint_meter(m), "b:r2")]
    assert sum(h.totals().values(), Decimal(0)) == stream + 7


def test_backfill_rows_of_older_versions_stay_visible_until_replaced(store: Store) -> None:
    h = make_history(store, n=40)
    t, m = h.tenant, h.meter.id
    stream = sum(h.totals().values(), Decimal(0))
    # rows an older version wrote straight into usage_minute, then the migration registering them
    store.insert(
        "usage_minute", [_usage(t, m, "b:legacy1", 5)], USAGE_COLUMNS, settings=ONE_PART_SETTINGS
    )
    for _ in range(2):  # applied twice (a file re-run after a failure): still one visible run
        store.command(
            f"DELETE FROM {store.database}.schema_migrations WHERE name = '031_backfill.sql'",
            settings={"mutations_sync": 2},
        )
        assert store.migrate() == ["031_backfill.sql"]
    bs = BackfillStore(store)
    assert bs.visible_run(t, m) == "legacy1"
    assert sum(h.totals().values(), Decimal(0)) == stream + 5
    bs.save_run(RunRecord(t, m, "r9", state=COMPLETE, finished_ms=5, version=1))
    bs.write_chunk(t, m, "r9", [_usage(t, m, "b:r9", 2)], Checkpoint(1, "x", 1, 1, 0))
    assert sum(h.totals().values(), Decimal(0)) == stream + 2
    bs.retire_runs(t, m, "r9")
    (left,) = store.query_rows(
        f"SELECT count() FROM {store.database}.usage_minute WHERE startsWith(origin, 'b:')"
    )[0]
    assert left == 0
