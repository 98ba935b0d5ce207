"""The local dedupe index (a sqlite file in a tmp dir; no broker, no ClickHouse)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.dedupe import DedupeIndex, index_path, rebuild
from tests.unit.streams.fakes import MemorySink, envelope_rows

DAY = 86_400_000


def test_contains_and_add(tmp_path: Path) -> None:
    idx = DedupeIndex.open(tmp_path, "tally.events", 3)
    assert idx.watermark == -1
    assert idx.contains_many([("t", "a")]) == set()
    idx.add_many([("t", "a", 10), ("t", "b", 11), ("u", "a", 12)], watermark=7)
    assert idx.watermark == 7
    assert idx.contains_many([("t", "a"), ("t", "c"), ("u", "a"), ("u", "b")]) == {
        ("t", "a"),
        ("u", "a"),
    }
    # first ingested_ms is kept on a re-add
    idx.add_many([("t", "a", 99)], watermark=8)
    assert idx.purge_older_than(11) == 1  # ("t","a",10)
    assert idx.contains_many([("t", "a")]) == set()
    idx.close()
    # persisted across reopen
    idx2 = DedupeIndex(index_path(tmp_path, 3), "tally.events")
    assert idx2.watermark == 8
    assert idx2.contains_many([("t", "b"), ("u", "a")]) == {("t", "b"), ("u", "a")}
    idx2.reset()
    assert idx2.watermark == -1
    assert len(idx2) == 0


def test_many_keys_chunked(tmp_path: Path) -> None:
    idx = DedupeIndex.open(tmp_path, "t", 0)
    keys = [("ten", f"id-{i}") for i in range(20_000)]
    idx.add_many(((t, e, 1) for t, e in keys[::2]), 0)
    found = idx.contains_many(keys)
    assert found == set(keys[::2])


def test_horizon_purge(tmp_path: Path) -> None:
    idx = DedupeIndex.open(tmp_path, "t", 0)
    now = 100 * DAY
    idx.add_many(
        [("t", "old", now - 36 * DAY), ("t", "edge", now - 35 * DAY), ("t", "new", now)], 5
    )
    assert idx.purge_older_than(now - 35 * DAY) == 1
    assert idx.contains_many([("t", "old"), ("t", "edge"), ("t", "new")]) == {
        ("t", "edge"),
        ("t", "new"),
    }
    assert idx.watermark == 5  # purge does not move the watermark


def test_rebuild_catches_up_to_store(tmp_path: Path) -> None:
    sink = MemorySink()
    sink.commit("tp", envelope_rows("tp", 0, [(0, "a"), (1, "b"), (2, "c"), (5, "d")]), [], {0: 5})
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    idx.add_many([("t1", "a", 1)], watermark=0)  # index knows offset 0 only
    added = rebuild(idx, sink, "tp", 0, 5, now_ms=1_700_000_100_000, horizon_ms=35 * DAY)
    assert added == 3
    assert idx.watermark == 5
    assert idx.contains_many([("t1", x) for x in "abcd"]) == {("t1", x) for x in "abcd"}
    assert rebuild(idx, sink, "tp", 0, 5, now_ms=1_700_000_100_000, horizon_ms=35 * DAY) == 0


def test_rebuild_resets_when_store_is_behind(tmp_path: Path) -> None:
    sink = MemorySink()  # a reset store: progress -1, no events
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    idx.add_many([("t1", "a", 1)], watermark=9)
    rebuild(idx, sink, "tp", 0, -1, now_ms=1_700_000_100_000, horizon_ms=35 * DAY)
    assert idx.watermark == -1
    assert idx.contains_many([("t1", "a")]) == set()
    # store behind but not empty: rebuilt from -1 up to M
    sink.commit("tp", envelope_rows("tp", 0, [(1, "x")]), [], {0: 1})
    idx.add_many([("t1", "zz", 1)], watermark=30)
    rebuild(idx, sink, "tp", 0, 1, now_ms=1_700_000_100_000, horizon_ms=35 * DAY)
    assert idx.watermark == 1
    assert idx.contains_many([("t1", "x"), ("t1", "zz")]) == {("t1", "x")}


def test_rebuild_respects_horizon(tmp_path: Path) -> None:
    sink = MemorySink()
    now = 1_700_000_000_000
    rows = envelope_rows("tp", 0, [(0, "old")], ingested_ms=now - 40 * DAY)
    rows += envelope_rows("tp", 0, [(1, "new")], ingested_ms=now - DAY)
    sink.commit("tp", rows, [], {0: 1})
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    rebuild(idx, sink, "tp", 0, 1, now_ms=now, horizon_ms=35 * DAY)
    assert idx.contains_many([("t1", "old"), ("t1", "new")]) == {("t1", "new")}


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.sampled_from(["t1", "t2"]), st.text(min_size=1, max_size=8)), max_size=80)
)
def test_index_is_a_set(tmp_path: Path, keys: list[tuple[str, str]]) -> None:
    idx = DedupeIndex(tmp_path / "prop.sqlite", "tp")
    idx.reset()
    half = keys[: len(keys) // 2]
    idx.add_many(((t, e, 1) for t, e in half), 0)
    assert idx.contains_many(keys) == set(half)
    assert len(idx) == len(set(half))
    idx.close()


def test_new_topic_generation_still_knows_ids_stored_by_the_old_one(tmp_path: Path) -> None:
    """Embedded mode: the in-memory broker restarts with a new topic; offsets start over at 0.

    Ids stored from the old topic (including ones the index never recorded because of a crash
    between commit and index update) must still be duplicates on the new topic; ids of the old
    topic's uncommitted tail (offset > its progress) must not be."""
    sink = MemorySink()
    sink.commit("gen1", envelope_rows("gen1", 0, [(0, "a"), (1, "b"), (2, "c")]), [], {0: 2})
    sink.commit("gen1", envelope_rows("gen1", 0, [(3, "tail")]), [], {})  # events, no progress
    idx = DedupeIndex.open(tmp_path, "gen1", 0)
    idx.add_many([("t1", "a", 1)], watermark=0)  # crashed before recording offsets 1..2
    idx.close()

    fresh = DedupeIndex.open(tmp_path, "gen2", 0)  # same file: partition 0
    assert fresh.watermark == -1  # nothing known about the new topic yet
    added = rebuild(fresh, sink, "gen2", 0, -1, now_ms=1_700_000_100_000, horizon_ms=35 * DAY)
    assert added == 2
    keys = [("t1", x) for x in ("a", "b", "c", "tail")]
    assert fresh.contains_many(keys) == {("t1", "a"), ("t1", "b"), ("t1", "c")}
    assert fresh.watermark_of("gen1") == 2
    assert fresh.watermark == -1
