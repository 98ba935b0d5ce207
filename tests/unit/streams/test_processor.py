"""BatchProcessor with an in-memory fake Sink (pure: no broker, no ClickHouse)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from schemas.meters import Meter
from streams.aggregation import merge_rows
from streams.dedupe import DedupeIndex
from streams.processor import BatchProcessor, MeterCache
from tests.unit.streams.fakes import MemorySink, meter

TOPIC = "tally.events"
ING = 1_700_000_000_000
T0 = 1_700_000_040_000


def payload(
    events: list[tuple[str, int, dict[str, Any]]],
    *,
    tenant: str = "t1",
    ingested: int = ING,
    type_: str = "api",
    customer: str = "c1",
) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "t": tenant,
            "at": ingested,
            "e": [[eid, type_, customer, t, props] for eid, t, props in events],
        }
    )


class Clock:
    def __init__(self, ms: int = ING + 1000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def make(
    tmp_path: Path,
    meters: list[Meter] | None = None,
    partitions: int = 4,
    sink: MemorySink | None = None,
    clock: Clock | None = None,
):  # type: ignore[no-untyped-def]
    sink = sink or MemorySink(meters if meters is not None else [meter()])
    indexes: dict[int, DedupeIndex] = {}

    def index_for(p: int) -> DedupeIndex:
        if p not in indexes:
            indexes[p] = DedupeIndex.open(tmp_path, TOPIC, p)
        return indexes[p]

    clock = clock or Clock()
    proc = BatchProcessor(TOPIC, sink, index_for, clock_ms=clock)
    for p in range(partitions):
        proc.assign(p, sink.progress(TOPIC).get(p, -1))
    return proc, sink, indexes


def usage_total(sink: MemorySink, meter_id: str = "id-m") -> dict[str, Any]:
    merged = merge_rows(r for r in sink.usage if r[1] == meter_id)
    events = sum(a.events for a in merged.values())
    total = sum((a.value_sum for a in merged.values()), Decimal(0))
    return {"events": events, "sum": total, "windows": len(merged)}


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name + "_total") or 0.0


def test_flush_builds_rows_and_progress(tmp_path: Path) -> None:
    proc, sink, _ = make(tmp_path, [meter(aggregation="sum", value_property="$.v")])
    assert proc.add(0, 0, payload([("a", T0, {"v": 2}), ("b", T0 + 61_000, {"v": "3.5"})]))
    assert proc.add(1, 7, payload([("c", T0, {"v": 1})]))
    assert proc.buffered_events == 3
    progress = proc.flush()
    assert progress == {0: 0, 1: 7}
    assert sink.progress(TOPIC) == {0: 0, 1: 7}
    row = sink.events[("t1", "a")]
    assert row == (
        "t1",
        "a",
        "api",
        "c1",
        datetime.fromtimestamp(T0 / 1000, UTC),
        '{"v":2}',
        datetime.fromtimestamp(ING / 1000, UTC),
        TOPIC,
        0,
        0,
        0,
    )
    assert sink.events[("t1", "b")][9:] == (0, 1)
    assert sink.events[("t1", "c")][8:] == (1, 7, 0)
    tot = usage_total(sink)
    assert tot == {"events": 3, "sum": Decimal("6.5"), "windows": 2}
    assert proc.buffered_events == 0


def test_first_copy_by_offset_and_index_wins(tmp_path: Path) -> None:
    proc, sink, _ = make(tmp_path, [meter(aggregation="sum", value_property="$.v")])
    proc.add(2, 10, payload([("x", T0, {"v": 1}), ("x", T0, {"v": 100}), ("y", T0, {"v": 5})]))
    proc.add(2, 11, payload([("y", T0, {"v": 50}), ("z", T0, {"v": 7})]))
    proc.flush()
    assert sink.events[("t1", "x")][5] == '{"v":1}'
    assert sink.events[("t1", "x")][9:] == (10, 0)
    assert sink.events[("t1", "y")][9:] == (10, 2)
    assert usage_total(sink)["sum"] == Decimal(13)
    assert usage_total(sink)["events"] == 3


def test_same_id_other_tenant_is_not_a_duplicate(tmp_path: Path) -> None:
    proc, sink, _ = make(
        tmp_path, [meter(tenant_id="t1"), meter("n", tenant_id="t2", meter_id="id-n")]
    )
    proc.add(0, 0, payload([("x", T0, {})], tenant="t1"))
    proc.add(0, 1, payload([("x", T0, {})], tenant="t2"))
    proc.flush()
    assert set(sink.events) == {("t1", "x"), ("t2", "x")}
    assert usage_total(sink)["events"] == 1
    assert usage_total(sink, "id-n")["events"] == 1


def test_duplicates_across_flushes_use_the_index(tmp_path: Path) -> None:
    proc, sink, idx = make(tmp_path)
    before = metric("tally_worker_duplicates")
    proc.add(0, 0, payload([("a", T0, {}), ("b", T0, {})]))
    proc.flush()
    assert idx[0].watermark == 0
    proc.add(0, 1, payload([("a", T0, {}), ("c", T0, {})]))
    proc.add(3, 0, payload([("a", T0, {})]))  # other partition: its own index (not a dup there)
    progress = proc.flush()
    assert progress == {0: 1, 3: 0}
    assert usage_total(sink)["events"] == 4
    assert metric("tally_worker_duplicates") - before == 1


def test_batch_of_only_duplicates_still_advances_progress(tmp_path: Path) -> None:
    proc, sink, idx = make(tmp_path)
    proc.add(1, 0, payload([("a", T0, {})]))
    proc.flush()
    commits = sink.commits
    proc.add(1, 1, payload([("a", T0, {})]))
    assert proc.flush() == {1: 1}
    assert sink.commits == commits + 1
    assert sink.progress(TOPIC)[1] == 1
    assert idx[1].watermark == 1


def test_poison_is_counted_and_skipped_but_advances(tmp_path: Path) -> None:
    proc, sink, _ = make(tmp_path)
    before = metric("tally_worker_poison_messages")
    assert proc.add(0, 0, b"not json")
    assert proc.add(0, 1, orjson.dumps({"v": 99}))
    assert proc.add(0, 2, None)
    assert proc.add(0, 3, payload([("a", T0, {})]))
    assert proc.flush() == {0: 3}
    assert metric("tally_worker_poison_messages") - before == 3
    assert usage_total(sink)["events"] == 1
    proc.add(1, 0, b"\x00garbage")
    assert proc.flush() == {1: 0}
    assert sink.progress(TOPIC) == {0: 3, 1: 0}


def test_skips_offsets_at_or_below_store_progress(tmp_path: Path) -> None:
    sink = MemorySink([meter()])
    sink.commit(TOPIC, [], [], {0: 5})
    proc, _, _ = make(tmp_path, sink=sink)
    assert not proc.add(0, 4, payload([("a", T0, {})]))
    assert not proc.add(0, 5, payload([("b", T0, {})]))
    assert proc.add(0, 6, payload([("c", T0, {})]))
    assert not proc.add(0, 6, payload([("c", T0, {})]))  # redelivered while buffered
    proc.flush()
    assert set(sink.events) == {("t1", "c")}
    with pytest.raises(ValueError, match="not assigned"):
        proc.add(9, 0, payload([]))


def test_failed_commit_keeps_batch_and_retry_stores_once(tmp_path: Path) -> None:
    proc, sink, idx = make(tmp_path)
    proc.add(0, 0, payload([("a", T0, {}), ("b", T0, {})]))
    sink.fail_next = 2
    for _ in range(2):
        with pytest.raises(ConnectionError):
            proc.flush()
        assert proc.held_events == 2  # sealed in a link, not acked
        assert idx[0].watermark == -1  # not seen before it is stored
    proc.add(0, 1, payload([("b", T0, {}), ("c", T0, {})]))
    assert proc.flush() == {0: 1}  # the sealed link [0, 0], then a new link [1, 1]
    assert usage_total(sink)["events"] == 3
    assert sink.commits == 2


def test_ambiguous_failure_is_not_inserted_twice(tmp_path: Path) -> None:
    proc, sink, idx = make(tmp_path)
    proc.add(0, 0, payload([("a", T0, {}), ("b", T0, {})]))
    sink.fail_after_next = 1
    assert proc.flush() == {0: 0}  # commit raised, but progress shows it landed
    assert sink.commits == 1
    assert idx[0].watermark == 0
    assert idx[0].contains_many([("t1", "a"), ("t1", "b")]) == {("t1", "a"), ("t1", "b")}
    proc.add(0, 1, payload([("a", T0, {})]))
    proc.flush()
    assert usage_total(sink)["events"] == 2


def test_crash_between_commit_and_index_is_repaired_by_rebuild(tmp_path: Path) -> None:
    from streams.dedupe import rebuild

    proc, sink, idx = make(tmp_path)
    proc.add(0, 0, payload([("a", T0, {})]))
    proc.flush()
    idx[0].reset()  # as if step 4 never happened
    proc2, _, idx2 = make(tmp_path, sink=sink)  # restart: rebuild from the store's M
    rebuild(idx2.get(0) or proc2.index_for(0), sink, TOPIC, 0, 0, ING + 10, 35 * 86_400_000)
    proc2.add(0, 1, payload([("a", T0, {})]))
    proc2.flush()
    assert usage_total(sink)["events"] == 1


def test_meters_apply_after_created_and_cache_reloads(tmp_path: Path) -> None:
    clock = Clock(ING - 10_000)
    sink = MemorySink([])
    proc, _, _ = make(tmp_path, sink=sink, clock=clock)
    proc.add(0, 0, payload([("a", T0, {})], ingested=ING - 20_000))
    proc.flush()
    assert sink.meter_loads == 1
    # a meter is created at ING; the cache (loaded at ING-10s) is older than the next batch
    sink.meters.append(meter(created_at=datetime.fromtimestamp(ING / 1000, UTC)))
    clock.ms = ING + 5_000
    proc.add(0, 1, payload([("b", T0, {})], ingested=ING - 1))  # before created_at: no
    proc.add(0, 2, payload([("c", T0, {})], ingested=ING + 1000))
    proc.flush()
    assert sink.meter_loads == 2
    assert usage_total(sink)["events"] == 1
    # cache loaded at ING+5s, newer than this batch: no reload
    proc.add(0, 3, payload([("d", T0, {})], ingested=ING + 2000))
    proc.flush()
    assert sink.meter_loads == 2
    assert usage_total(sink)["events"] == 2


def test_meter_value_errors_are_counted(tmp_path: Path) -> None:
    proc, sink, _ = make(tmp_path, [meter(aggregation="sum", value_property="$.v")])
    before = metric("tally_worker_meter_value_errors")
    proc.add(0, 0, payload([("a", T0, {"v": "x"}), ("b", T0, {}), ("c", T0, {"v": 1})]))
    proc.flush()
    assert metric("tally_worker_meter_value_errors") - before == 2
    assert len(sink.events) == 3  # the ledger keeps them
    assert usage_total(sink)["events"] == 1


def test_meter_cache_only_reloads_when_older() -> None:
    loads: list[int] = []
    clock = Clock(100)
    cache = MeterCache(lambda: loads.append(1) or [], clock)  # type: ignore[func-returns-value]
    cache.ensure(50)
    cache.ensure(100)
    assert len(loads) == 1
    cache.ensure(101)
    assert len(loads) == 2


def test_revoke_drops_buffer_of_partition(tmp_path: Path) -> None:
    proc, sink, _ = make(tmp_path)
    proc.add(0, 0, payload([("a", T0, {})]))
    proc.add(1, 0, payload([("b", T0, {})]))
    proc.revoke(1)
    assert proc.flush() == {0: 0}
    assert set(sink.events) == {("t1", "a")}
    assert not proc.assigned(1)


# --- the exactly-once invariant under random duplicates, batching and failures --------------

stream_st = st.lists(
    st.tuples(
        st.integers(0, 3),  # partition
        st.lists(
            st.tuples(st.integers(0, 25), st.integers(1, 9), st.integers(0, 180_000)),
            min_size=1,
            max_size=6,
        ),  # events: (id number, value, time offset)
        st.booleans(),  # flush after this message?
        st.integers(0, 4),  # failure mode: 0 fail before, 1 fail after store, else none
    ),
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stream_st)
def test_exactly_once_under_duplicates_and_failures(tmp_path_factory, stream) -> None:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("eo")
    proc, sink, _ = make(tmp, [meter(aggregation="sum", value_property="$.v")])
    offsets = dict.fromkeys(range(4), -1)
    truth: dict[str, tuple[int, int]] = {}
    for p, evs, do_flush, fail in stream:
        offsets[p] += 1
        # ids are tenant-unique, so put each id in one partition (as partition_for does)
        evs = [(f"p{p}-{i}", v, t) for i, v, t in evs]
        for eid, v, t in evs:
            truth.setdefault(eid, (v, t))
        proc.add(p, offsets[p], payload([(eid, T0 + t, {"v": v}) for eid, v, t in evs]))
        if do_flush:
            if fail == 0:
                sink.fail_next = 1
                with pytest.raises(ConnectionError):
                    proc.flush()
                proc.flush()
            elif fail == 1:
                sink.fail_after_next = 1
                try:  # the link whose answer was lost is verified stored; later links of the
                    proc.flush()  # same attempt were not sent and stay sealed
                except TimeoutError:
                    proc.flush()
            else:
                proc.flush()
    proc.flush()
    assert set(sink.events) == {("t1", eid) for eid in truth}
    tot = usage_total(sink)
    assert tot["events"] == len(truth)
    assert tot["sum"] == sum(v for v, _ in truth.values())
    assert sink.progress(TOPIC) == {p: o for p, o in offsets.items() if o >= 0}
