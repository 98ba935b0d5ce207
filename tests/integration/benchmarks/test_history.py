"""The benchmark's history writer writes what the worker would have written for the same events.

The expected usage rows come from the worker's own pure code (``streams.matching`` and
``streams.aggregation``) applied to the events the writer stored; the writer computes its rows
in SQL. Real chDB, a fresh database per test.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from datetime import UTC
from typing import Any

import orjson
import pytest

from benchmarks.history import ENVELOPE_EVENTS, HistorySpec, write_history
from benchmarks.queries import SHAPES
from benchmarks.workload import METERS
from clickhouse.repo import Repo
from clickhouse.rollup import day_rows
from clickhouse.sink import USAGE_COLUMNS, ClickHouseSink
from clickhouse.store import Store
from schemas.columns import usage_rows, usage_table
from schemas.envelope import EnvelopeEvent, partition_for
from schemas.meters import MeterSpec
from schemas.timeutil import epoch_ms
from streams.aggregation import WindowTable, merge_rows
from streams.matching import MeterIndex

DAY_MS = 86_400_000


def _setup(store: Store, tenants: int = 2) -> list[str]:
    repo = Repo(store)
    ids = []
    for i in range(tenants):
        tenant, _key = repo.create_tenant(f"bench-{i}")
        for m in METERS:
            repo.create_meter(tenant.tenant_id, MeterSpec.model_validate(m))
        ids.append(tenant.tenant_id)
    return ids


def _spec(
    store: Store, chdb_url: str, tenant_ids: list[str], target: int, **kw: Any
) -> HistorySpec:
    now = int(time.time() * 1000)
    base: dict[str, Any] = {
        "store_url": chdb_url,
        "database": store.database,
        "tenant_ids": tenant_ids,
        "target_events": target,
        "span_start_ms": now - 3 * DAY_MS,
        "span_end_ms": now - 60_000,
        "customers": 15,
        "zipf_s": 1.1,
        "late_rate": 0.1,
        "partitions": 8,
        "seed": 3,
        "tag": "t1",
    }
    base.update(kw)
    return HistorySpec(**base)


def _events(store: Store) -> list[tuple]:
    return store.query_rows(
        "SELECT tenant_id, event_id, event_type, customer, toUnixTimestamp64Milli(time), "
        "properties, toUnixTimestamp64Milli(ingested_at), source_topic, source_partition, "
        f"source_offset, source_index FROM {store.database}.events"
    )


def _no_progress(*_a: Any) -> None:
    return None


@pytest.fixture
def chdb_url(chdb_dir: Any) -> str:
    return f"chdb://{chdb_dir}"


def test_history_matches_what_the_worker_would_write(store: Store, chdb_url: str) -> None:
    tenant_ids = _setup(store)
    out = write_history(_spec(store, chdb_url, tenant_ids, 3000), progress=_no_progress)
    assert out["events_before"] == 0
    assert out["events_written"] == 3000
    assert out["events_rows"] == 3000

    rows = _events(store)
    assert len(rows) == 3000
    assert len({(r[0], r[1]) for r in rows}) == 3000  # ids unique per tenant
    assert {r[0] for r in rows} == set(tenant_ids)
    late = 0
    positions: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for tenant, eid, etype, _cust, t_ms, props, ing_ms, topic, part, off, idx in rows:
        assert etype == METERS[0]["event_type"]
        assert topic == out["topic"]
        assert part == partition_for(tenant, eid, 8)
        assert ing_ms >= t_ms
        late += ing_ms - t_ms >= 3_600_000
        doc = orjson.loads(props)
        assert list(doc) == ["endpoint", "region", "tokens", "user"]
        assert orjson.dumps(doc).decode() == props  # compact, as the worker stores it
        positions[part].append((off, idx))
    assert 150 < late < 450  # ~10 %
    for part, pos in positions.items():
        assert len(set(pos)) == len(pos), f"partition {part}: an (offset, index) used twice"
        offsets = sorted({o for o, _ in pos})
        assert offsets == list(range(len(offsets))), f"partition {part}: offsets not contiguous"
        per_offset = Counter(o for o, _ in pos)
        assert max(per_offset.values()) <= ENVELOPE_EVENTS
        assert all(i < ENVELOPE_EVENTS for _, i in pos)

    # The progress rows say every offset of the generation is stored.
    progress = ClickHouseSink(store).progress(out["topic"])
    assert progress == {p: max(o for o, _ in pos) for p, pos in positions.items()}

    # Meters existed before the history (or the worker would not have counted it).
    meters = Repo(store).all_meters()
    assert len(meters) == len(tenant_ids) * len(METERS)
    assert all(epoch_ms(m.created_at) <= min(r[6] for r in rows) for m in meters)

    # The usage rows equal the worker's own aggregation of the stored events.
    index = MeterIndex(meters)
    table = WindowTable()
    for tenant, eid, etype, cust, t_ms, props, _ing_ms, *_ in rows:
        ev = EnvelopeEvent(eid, etype, cust, t_ms, orjson.loads(props))
        for cm in index.candidates(tenant, etype):
            c = cm.match(ev)
            assert c is not None
            table.add(tenant, cust, t_ms, eid, c)
    # And the day rows equal the worker's own day rows of them (clickhouse.rollup).
    minutes = list(table.rows())
    days = usage_rows(day_rows(usage_table(minutes)))
    for want_rows, only_days in ((minutes, False), (days, True)):
        want = merge_rows(want_rows)
        got_rows = store.query_rows(
            f"SELECT {', '.join(USAGE_COLUMNS)} FROM {store.database}.usage_minute "
            "WHERE tenant_id != '' AND startsWith(meter_id, 'd:') = {d:Bool}",
            {"d": only_days},
        )
        assert all(r[5] == "s" and r[4] == "" and r[14] == 0 for r in got_rows)
        got = merge_rows(
            (*r[:3], r[3] if r[3].tzinfo else r[3].replace(tzinfo=UTC), *r[4:]) for r in got_rows
        )
        assert got.keys() == want.keys()
        diff = [k for k in want if got[k] != want[k]]
        assert not diff, (
            f"{len(diff)} windows differ, e.g. {diff[0]}: {got[diff[0]]} != {want[diff[0]]}"
        )


def test_history_tops_up_to_the_target_and_times_direct_queries(
    store: Store, chdb_url: str
) -> None:
    tenant_ids = _setup(store, tenants=1)
    first = write_history(_spec(store, chdb_url, tenant_ids, 1000), progress=_no_progress)
    assert first["events_written"] == 1000
    calls: list[tuple[int, int]] = []
    second = write_history(
        _spec(store, chdb_url, tenant_ids, 2500, tag="t2", seed=4, query_n=3, query_warmup=1),
        progress=lambda done, total, _what="": calls.append((done, total)),
    )
    assert second["events_before"] == 1000
    assert second["events_written"] == 1500
    assert second["events_rows"] == 2500
    assert second["topic"] != first["topic"]
    assert calls and calls[-1][0] == calls[-1][1]
    assert set(second["direct_queries"]) == {f"{s.kind}.{s.aggregation}" for s in SHAPES}
    for q in second["direct_queries"].values():
        assert q["n"] == 3
    # The direct path (the floor of the HTTP figures) answers from the written rows.
    assert second["direct_queries"]["tenant_by_customer.count"]["rows_mean"] >= 5
    assert second["direct_queries"]["customer_month_by_day.sum"]["rows_mean"] >= 1
    # Nothing to add: the store is already at the target.
    third = write_history(_spec(store, chdb_url, tenant_ids, 2000, tag="t3"), progress=_no_progress)
    assert third["events_written"] == 0
    assert third["events_rows"] == 2500
