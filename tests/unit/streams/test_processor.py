"""BatchProcessor with an in-memory fake Sink (pure: no broker, no ClickHouse)."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.control import CONTROL_PREFIX, encode_activate
from schemas.envelope import encode, group_rows
from schemas.meters import Meter
from streams.aggregation import merge_rows
from streams.dedupe import DedupeIndex, rebuild
from streams.processor import BatchProcessor, MeterCache
from tests.unit.schemas.strategies import property_values
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


def metric(proc: BatchProcessor, name: str, **labels: str) -> float:
    """A counter of the processor's own registry (``streams.metrics.WorkerMetrics``)."""
    return proc.metrics.registry.get_sample_value(name + "_total", labels) or 0.0


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


def test_late_events_are_counted_at_the_bound_and_after_dropped_copies(tmp_path: Path) -> None:
    """An event is late when its time is more than late_ms (60 s) before its acceptance; the
    count and the per-envelope columns (acceptance time, tenant, offset) follow the kept
    events when copies are dropped between envelopes."""
    proc, sink, _ = make(tmp_path, [meter()])
    later = ING + 10_000
    proc.add(3, 4, payload([("a", ING - 60_000, {}), ("b", ING - 60_001, {})]))
    proc.add(3, 5, payload([("b", ING - 60_001, {}), ("c", later - 60_001, {})], ingested=later))
    proc.add(3, 6, payload([("d", later - 60_000, {})], tenant="t2", ingested=later))
    proc.flush()
    assert metric(proc, "tally_worker_late_events") == 2  # b and c; a and d are at the bound
    at = datetime.fromtimestamp(later / 1000, UTC)
    assert sink.events[("t1", "b")][6] == datetime.fromtimestamp(ING / 1000, UTC)
    assert sink.events[("t1", "c")][6:] == (at, TOPIC, 3, 5, 1)
    assert sink.events[("t2", "d")][0] == "t2"
    assert sink.events[("t2", "d")][6:] == (at, TOPIC, 3, 6, 0)


def test_ledger_columns_after_unencodable_events_and_dropped_copies(tmp_path: Path) -> None:
    """The per-envelope columns of the ledger (tenant, acceptance time, partition, offset) and
    the late count follow the kept events when an event in the middle of an envelope cannot be
    written (left out after the dedupe) and a copy is dropped in a later envelope."""
    proc, sink, _ = make(tmp_path, [meter()])
    later = ING + 10_000
    deep = b'{"x":' * 300 + b"{}" + b"}" * 300  # read by orjson, not written (254 levels)
    raw = b'{"v":1,"t":"t1","at":%d,"e":[["a","api","c1",%d,{}],["g","api","c1",%d,%b],' % (
        ING,
        ING,
        ING - 100_000,
        deep,
    )
    proc.add(2, 0, raw + b'["h","api","c1",%d,{}]]}' % (ING - 60_001))
    two = [("a", later, {}), ("i", later - 60_000, {})]
    proc.add(2, 1, payload(two, tenant="t2", ingested=later, customer="c2"))
    three = [("h", ING - 60_001, {}), ("j", later - 60_001, {})]
    proc.add(2, 2, payload(three, ingested=later, customer="c3"))
    proc.flush()
    at, then = (datetime.fromtimestamp(ms / 1000, UTC) for ms in (ING, later))
    assert {k: (r[0], *r[6:]) for k, r in sink.events.items()} == {
        ("t1", "a"): ("t1", at, TOPIC, 2, 0, 0),
        ("t1", "h"): ("t1", at, TOPIC, 2, 0, 2),
        ("t2", "a"): ("t2", then, TOPIC, 2, 1, 0),
        ("t2", "i"): ("t2", then, TOPIC, 2, 1, 1),
        ("t1", "j"): ("t1", then, TOPIC, 2, 2, 1),
    }
    assert metric(proc, "tally_worker_late_events") == 2  # h and j; g is not kept, i at the bound
    assert metric(proc, "tally_worker_events", outcome="duplicate") == 1
    # the meter (tenant t1) counted t1's kept events only, by their customers
    assert {(r[0], r[2]) for r in sink.usage if r[1] == "id-m"} == {("t1", "c1"), ("t1", "c3")}


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
    before = metric(proc, "tally_worker_events", outcome="duplicate")
    proc.add(0, 0, payload([("a", T0, {}), ("b", T0, {})]))
    proc.flush()
    assert idx[0].watermark == 0
    proc.add(0, 1, payload([("a", T0, {}), ("c", T0, {})]))
    proc.add(3, 0, payload([("a", T0, {})]))  # other partition: its own index (not a dup there)
    progress = proc.flush()
    assert progress == {0: 1, 3: 0}
    assert usage_total(sink)["events"] == 4
    assert metric(proc, "tally_worker_events", outcome="duplicate") - before == 1


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
    before = metric(proc, "tally_worker_events", outcome="poison")
    assert proc.add(0, 0, b"not json")
    assert proc.add(0, 1, orjson.dumps({"v": 99}))
    assert proc.add(0, 2, None)
    assert proc.add(0, 3, payload([("a", T0, {})]))
    assert proc.flush() == {0: 3}
    assert metric(proc, "tally_worker_events", outcome="poison") - before == 3
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


def test_meter_value_errors_are_counted(tmp_path: Path) -> None:
    proc, sink, _ = make(tmp_path, [meter(aggregation="sum", value_property="$.v")])
    before = metric(proc, "tally_worker_meter_value_errors")
    proc.add(0, 0, payload([("a", T0, {"v": "x"}), ("b", T0, {}), ("c", T0, {"v": 1})]))
    proc.flush()
    assert metric(proc, "tally_worker_meter_value_errors") - before == 2
    assert len(sink.events) == 3  # the ledger keeps them
    assert usage_total(sink)["events"] == 1
    # each is a meter_value dead letter naming the event, its position and the meter
    letters = sorted((r[8], r[2], r[7], r[9]) for r in sink.dead_letters.values())
    m_id = proc.meters.index.by_id and next(iter(proc.meters.index.by_id))
    assert letters == [("a", "meter_value", 0, m_id), ("b", "meter_value", 1, m_id)]


def test_unencodable_properties_and_bad_rows_become_dead_letters(tmp_path: Path) -> None:
    """The columnar path leaves out bad rows (invalid_event, with their envelope position) and
    events whose properties cannot be written as JSON; their neighbours are stored and counted."""
    proc, sink, _ = make(tmp_path, [meter()])
    raw = orjson.dumps(
        {
            "v": 1,
            "t": "t1",
            "at": ING,
            "e": [
                ["a", "api", "c1", T0, {}],
                ["b", "api", "", T0, {}],  # empty customer
                ["c", "api", "c1", T0, {}],
            ],
        }
    )
    proc.add(0, 0, raw)
    proc.add(0, 1, payload([("d", T0, {}), ("e", T0, {"p": 1})]))
    # 300 levels of nesting: orjson reads it (up to 1024) but writes at most 254
    deep = b'{"x":' * 300 + b"{}" + b"}" * 300
    head = b'{"v":1,"t":"t1","at":%d,"e":[["f","api","c1",%d,{}],["g","api","c1",%d,' % (
        ING,
        T0,
        T0,
    )
    proc.add(0, 2, head + deep + b"]]}")
    proc.flush()
    stored = sorted(r[1] for r in sink.events)
    assert stored == ["a", "c", "d", "e", "f"]
    assert usage_total(sink)["events"] == 5
    letters = sorted((r[8], r[2], r[6], r[7]) for r in sink.dead_letters.values())
    assert letters == [("b", "invalid_event", 0, 1), ("g", "invalid_event", 2, 1)]


def test_meter_cache_reload_policy() -> None:
    loads: list[int] = []
    fail = {"n": 0}

    def load() -> list[Meter]:
        if fail["n"]:
            fail["n"] -= 1
            raise ConnectionError("store down")
        loads.append(1)
        return [meter("a", meter_id="id-a")]

    clock = Clock(100)
    cache = MeterCache(load, clock, reload_ms=1000)
    fail["n"] = 1
    with pytest.raises(ConnectionError):  # the first load must succeed
        cache.ensure()
    assert set(cache.ensure().by_id) == {"id-a"} and len(loads) == 1
    clock.ms = 1099
    cache.ensure()
    assert len(loads) == 1  # fresh enough
    marker_meter = meter("b", meter_id="id-b", activation_topic=TOPIC)
    cache.ensure([marker_meter])
    assert len(loads) == 2  # a marker forces a reload; the store does not know id-b: not added
    assert set(cache.index.by_id) == {"id-a"}
    clock.ms = 2200
    fail["n"] = 1
    # the reload fails: the last good meters stay and the marker's own meter is added
    assert set(cache.ensure([marker_meter]).by_id) == {"id-a", "id-b"}
    fail["n"] = 1
    assert set(cache.ensure().by_id) == {"id-a", "id-b"}  # a failing periodic reload is no error
    cache.ensure()
    assert len(loads) == 3 and set(cache.index.by_id) == {"id-a"}  # the store is the authority


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
            elif fail == 1:  # stored, answer lost: this round may end unresolved, the next not
                sink.fail_after_next = 1
                with contextlib.suppress(TimeoutError):
                    proc.flush()
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


# --- meter activation by markers (streams.activation) ----------------------------------------


def marker(m: Meter) -> bytes:
    return encode_activate(m)


def test_marker_activates_a_meter_per_partition(tmp_path: Path) -> None:
    m = meter(activation_topic=TOPIC)
    proc, sink, _ = make(tmp_path, [m])
    proc.add(0, 0, payload([("a", T0, {})]))  # before the marker: history (backfill)
    proc.add(0, 1, marker(m))
    proc.add(0, 2, payload([("b", T0, {})]))  # after it: the stream counts it
    proc.add(1, 0, payload([("c", T0, {})]))  # partition without a marker yet
    assert proc.flush() == {0: 2, 1: 0}
    assert usage_total(sink)["events"] == 1
    assert sink.activation_rows == [("t1", "id-m", TOPIC, 0, 1)]
    assert len(sink.events) == 3  # the ledger has every event
    proc.add(1, 1, marker(m))
    proc.add(1, 2, payload([("d", T0, {})]))
    proc.flush()
    assert usage_total(sink)["events"] == 2
    assert sink.activation_rows[-1] == ("t1", "id-m", TOPIC, 1, 1)


def test_marker_between_two_flushes_and_repeats(tmp_path: Path) -> None:
    m = meter(activation_topic=TOPIC)
    proc, sink, _ = make(tmp_path, [m])
    proc.add(2, 0, payload([("a", T0, {})]))
    proc.add(2, 1, marker(m))  # the last message of this flush
    proc.flush()
    assert usage_total(sink)["events"] == 0
    proc.add(2, 2, payload([("b", T0, {})]))  # first message of the next flush
    proc.add(2, 3, marker(m))  # a repeat (a resumed create): ignored
    proc.add(2, 4, payload([("c", T0, {})]))
    proc.flush()
    assert usage_total(sink)["events"] == 2
    assert sink.activation_rows == [("t1", "id-m", TOPIC, 2, 1)]


def test_activation_is_rebuilt_from_the_store_after_a_restart(tmp_path: Path) -> None:
    m = meter(activation_topic=TOPIC)
    proc, sink, _ = make(tmp_path, [m])
    proc.add(0, 0, marker(m))
    proc.add(0, 1, payload([("a", T0, {})]))
    proc.flush()
    # restart: a new processor knows nothing but the store (progress M=1, activation row @0)
    proc2, _, _ = make(tmp_path / "b", sink=sink)
    proc2.add(0, 2, payload([("b", T0, {})]))
    proc2.flush()
    assert usage_total(sink)["events"] == 2
    # a partition assigned to a processor whose store rows are above its progress M: not loaded
    proc3, _, _ = make(tmp_path / "c", sink=MemorySink([m]))
    proc3.sink.activation_rows.append(("t1", "id-m", TOPIC, 0, 5))  # written, never committed
    proc3.add(0, 0, payload([("x", T0, {})]))
    proc3.flush()
    assert usage_total(proc3.sink)["events"] == 0


def test_failed_flush_with_a_marker_is_replayed_identically(tmp_path: Path) -> None:
    m = meter(activation_topic=TOPIC)
    proc, sink, _ = make(tmp_path, [m])
    proc.add(0, 0, payload([("a", T0, {})]))
    proc.add(0, 1, marker(m))
    proc.add(0, 2, payload([("b", T0, {})]))
    sink.fail_activations_next = 1
    with pytest.raises(ConnectionError):
        proc.flush()
    sink.fail_next = 1  # the activation rows land, the commit fails
    with pytest.raises(ConnectionError):
        proc.flush()
    assert sink.activation_rows == [("t1", "id-m", TOPIC, 0, 1)] and sink.commits == 0
    # crash: a new owner starts from the store's progress (-1) and replays the partition
    proc2, _, _ = make(tmp_path / "b", sink=sink)
    proc2.add(0, 0, payload([("a", T0, {})]))
    proc2.add(0, 1, marker(m))
    proc2.add(0, 2, payload([("b", T0, {})]))
    proc2.flush()
    assert usage_total(sink)["events"] == 1
    assert set(sink.activation_rows) == {("t1", "id-m", TOPIC, 0, 1)}  # the same row again


def test_generations_legacy_meters_and_foreign_markers(tmp_path: Path) -> None:
    topic = "tally.events.g2000"
    older = meter("o", meter_id="id-o", activation_topic="tally.events.g1000")
    newer = meter("n", meter_id="id-n", activation_topic="tally.events.g3000")
    legacy = meter("l", meter_id="id-l")  # no activation topic: applies everywhere
    sink = MemorySink([older, newer, legacy])
    proc = BatchProcessor(topic, sink, lambda p: DedupeIndex.open(tmp_path, topic, p))
    proc.assign(0, -1)
    proc.add(0, 0, payload([("a", T0, {})]))
    proc.add(0, 1, marker(newer))  # a marker of another topic's meter: ignored
    proc.add(0, 2, payload([("b", T0, {})]))
    proc.flush()
    assert usage_total(sink, "id-o")["events"] == 2
    assert usage_total(sink, "id-l")["events"] == 2
    assert usage_total(sink, "id-n")["events"] == 0
    assert sink.activation_rows == []


def test_bad_control_messages_are_poison(tmp_path: Path) -> None:
    m = meter(activation_topic=TOPIC)
    proc, sink, _ = make(tmp_path, [m])
    before = metric(proc, "tally_worker_events", outcome="poison")
    proc.add(0, 0, CONTROL_PREFIX + b'{"v": 1, "kind": "reboot"}')
    proc.add(0, 1, CONTROL_PREFIX + b"not json")
    proc.add(0, 2, CONTROL_PREFIX + orjson.dumps({"v": 1, "kind": "activate_meter", "meter": {}}))
    proc.add(0, 3, payload([("a", T0, {})]))
    assert proc.flush() == {0: 3}
    assert metric(proc, "tally_worker_events", outcome="poison") - before == 3
    assert usage_total(sink)["events"] == 0 and sink.activation_rows == []


def test_marker_activates_without_the_store_and_deletion_stops_it(tmp_path: Path) -> None:
    m = meter(activation_topic=TOPIC)
    clock = Clock()
    sink = MemorySink([])
    proc, _, _ = make(tmp_path, sink=sink, clock=clock)
    proc.add(0, 0, payload([("a", T0, {})]))
    proc.flush()  # first load: no meters
    sink.meters.append(m)
    sink.fail_meter_loads = 1  # the reload forced by the marker fails: the marker's JSON is used
    proc.add(0, 1, marker(m))
    proc.add(0, 2, payload([("b", T0, {})]))
    proc.flush()
    assert usage_total(sink)["events"] == 1
    sink.meters.clear()  # the meter is deleted; the next reload (a few seconds later) drops it
    clock.ms += 60_000
    proc.add(0, 3, payload([("c", T0, {})]))
    proc.flush()
    assert usage_total(sink)["events"] == 1


marker_stream_st = st.lists(
    st.tuples(
        st.integers(0, 2),  # partition
        st.one_of(
            st.none(),  # a marker (repeats are fine)
            st.lists(st.integers(0, 15), min_size=1, max_size=4),  # event id numbers
        ),
        st.booleans(),  # flush after this message?
        st.integers(0, 5),  # 0: commit fails, 1: answer lost, 2: activation rows fail, else ok
        st.booleans(),  # restart (new processor, state from the store) after this message?
    ),
    max_size=30,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(marker_stream_st)
def test_stream_counts_exactly_the_events_after_the_first_marker(tmp_path_factory, stream) -> None:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("act")
    m = meter(activation_topic=TOPIC)
    sink = MemorySink([m])
    proc, _, _ = make(tmp / "0", sink=sink)
    offsets = dict.fromkeys(range(3), -1)
    first_marker: dict[int, int] = {}
    first_copy: dict[str, tuple[int, int]] = {}  # id -> (partition, offset) of its first copy
    restarts = 0
    for p, evs, do_flush, fail, restart in stream:
        offsets[p] += 1
        if evs is None:
            first_marker.setdefault(p, offsets[p])
            proc.add(p, offsets[p], marker(m))
        else:
            ids = [f"p{p}-{i}" for i in evs]
            for eid in ids:
                first_copy.setdefault(eid, (p, offsets[p]))
            proc.add(p, offsets[p], payload([(eid, T0, {}) for eid in ids]))
        if do_flush:
            if fail == 0:
                sink.fail_next = 1
                with pytest.raises(ConnectionError):
                    proc.flush()
            elif fail == 1:  # stored, answer lost: this round may end unresolved, the next not
                sink.fail_after_next = 1
                with contextlib.suppress(TimeoutError):
                    proc.flush()
            elif fail == 2:  # fails only if the batch has a first marker
                sink.fail_activations_next = 1
                with contextlib.suppress(ConnectionError):
                    proc.flush()
                sink.fail_activations_next = 0
            proc.flush()
        if restart:  # what is not flushed is lost; Kafka redelivers it from the store's progress
            restarts += 1
            proc, _, _ = make(tmp / str(restarts), sink=sink)
            stored = sink.progress(TOPIC)
            for q in range(3):  # as the worker does on assignment
                rebuild(proc.index_for(q), sink, TOPIC, q, stored.get(q, -1), ING, 86_400_000)
            offsets = {q: stored.get(q, -1) for q in range(3)}
            first_marker = {q: o for q, o in first_marker.items() if o <= offsets[q]}
            first_copy = {e: (q, o) for e, (q, o) in first_copy.items() if o <= offsets[q]}
    proc.flush()
    want = sum(1 for q, o in first_copy.values() if first_marker.get(q, 1 << 60) < o)
    assert usage_total(sink)["events"] == want
    assert set(sink.events) == {("t1", e) for e in first_copy}
    rows = {(q, o) for _t, _m, _top, q, o in sink.activation_rows}
    assert rows == set(first_marker.items())


wire_events = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d", "e", "f"]),  # ids repeat: duplicates
        st.integers(T0, T0 + 300_000),
        st.dictionaries(st.sampled_from(["v", "w"]), property_values, max_size=2),
    ),
    max_size=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(wire_events, min_size=1, max_size=4), st.lists(st.booleans(), min_size=4, max_size=4)
)
def test_both_wire_versions_store_the_same_ledger_rows_and_windows(
    tmp_path_factory: pytest.TempPathFactory,
    messages: list[list[tuple[str, int, dict[str, Any]]]],
    as_v1: list[bool],
) -> None:
    """The same events sent as version 1 envelopes and as version 2 envelopes (some links mixing
    both, as during an upgrade): the same ledger rows (the properties text included: version 2's
    property line as written, version 1's written by the worker) and the same minute windows."""
    meters = [meter(aggregation="sum", value_property="$.v")]
    got = []
    for version_of in (lambda _n: True, lambda n: as_v1[n % 4], lambda _n: False):
        proc, sink, indexes = make(tmp_path_factory.mktemp("p"), meters, partitions=1)
        for n, evs in enumerate(messages):
            if version_of(n):
                body = payload(evs)
            else:
                rows = [(eid, "api", "c1", t, props) for eid, t, props in evs]
                (env,) = group_rows("t1", ING, rows, 1, 1000) if rows else [None]
                body = env.payload if env is not None else encode("t1", ING, [])
                assert body.startswith(b'{"v":2,')
            proc.add(0, n, body)
        proc.flush()
        for idx in indexes.values():
            idx.close()
        got.append((sink.events, sorted(sink.usage, key=repr), sink.dead_letters))
    assert got[0] == got[1] == got[2]
