"""The local dedupe index (a sqlite file in a tmp dir; no broker, no ClickHouse)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from _pytest.monkeypatch import MonkeyPatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams import dedupe
from streams.dedupe import PAGE_SIZE, DedupeIndex, index_path, rebuild
from tests.unit.streams.fakes import MemorySink, envelope_rows

DAY = 86_400_000


def record(idx: DedupeIndex, rows: list[tuple[str, str, int]], watermark: int) -> None:
    """``record_keys`` of (tenant, id, ingested_ms) rows."""
    idx.record_keys([(t, e) for t, e, _ms in rows], [ms for _t, _e, ms in rows], watermark)


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


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["t1", "t2"]),
            st.text(
                st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                min_size=1,
                max_size=6,
            ),
            st.sampled_from([1, 2, 7, 2**41]),  # few values: runs, and a value met again later
        ),
        min_size=1,
        max_size=120,
    )
)
def test_a_batch_written_behind_holds_each_id_with_its_first_ingested_ms(
    tmp_path: Path, rows: list[tuple[str, str, int]]
) -> None:
    """The write behind the flushes (``_json_batch``: runs of ids with the same ingested_ms)
    puts every recorded id in the file once, with the ingested_ms it was first recorded with."""
    path = tmp_path / "runs.sqlite"
    path.unlink(missing_ok=True)
    idx = DedupeIndex(path, "tp", pending_max=1)
    first: dict[tuple[str, str], int] = {}
    for t, e, ms in rows:
        first.setdefault((t, e), ms)
    record(idx, rows, watermark=3)  # one batch, handed to the background thread at once
    idx.wait_behind()
    assert idx.pending == 0
    db = sqlite3.connect(path)
    on_file = db.execute(
        "SELECT tenant_id, event_id, ingested_ms FROM recent UNION ALL "
        "SELECT tenant_id, event_id, ingested_ms FROM seen"
    ).fetchall()
    db.close()
    assert sorted(on_file) == sorted((t, e, ms) for (t, e), ms in first.items())
    assert idx.watermark == 3
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


def test_record_keys_keeps_the_first_ingested_ms_of_an_id(tmp_path: Path) -> None:
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    idx.record_keys([("t", "a"), ("t", "b")], [5, 5], watermark=1)
    idx.record_keys([("t", "b"), ("t", "c")], [9, 9], watermark=2)  # "b" held: keeps 5
    idx.flush()
    assert idx.watermark == 2
    assert idx.contains_many([("t", "a"), ("t", "b"), ("t", "c")]) == {
        ("t", "a"),
        ("t", "b"),
        ("t", "c"),
    }
    assert idx.purge_older_than(9) == 2  # a and b (5), not c (9)
    with pytest.raises(ValueError, match="differ in length"):
        idx.record_keys([("t", "d")], [], watermark=3)
    assert idx.pending == 0


def test_recorded_ids_are_held_then_written_with_their_watermark(tmp_path: Path) -> None:
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    idx.pending_max = 4
    # a second reader of the same file, without an id filter: it sees the file as it is
    other = DedupeIndex.open(tmp_path, "tp", 0, filter_max_bytes=0)
    record(idx, [("t", "a", 1), ("t", "b", 1)], watermark=3)
    assert idx.pending == 2
    assert idx.contains_many([("t", "a"), ("t", "c"), ("u", "a")]) == {("t", "a")}
    assert other.contains_many([("t", "a"), ("t", "b")]) == set()  # not in the file yet
    assert other.watermark == -1
    record(idx, [("t", "b", 9), ("t", "c", 2)], watermark=5)  # "b" again: held once
    assert idx.pending == 3
    record(idx, [("u", "a", 2)], watermark=6)  # the 4th id: written behind, last watermark
    assert idx.contains_many([("t", "b"), ("u", "a"), ("u", "b")]) == {("t", "b"), ("u", "a")}
    idx.wait_behind()
    assert idx.pending == 0
    assert other.watermark == 6
    assert other.contains_many([("t", "a"), ("t", "b"), ("t", "c"), ("u", "a")]) == {
        ("t", "a"),
        ("t", "b"),
        ("t", "c"),
        ("u", "a"),
    }
    assert idx.purge_older_than(2) == 2  # "a" and "b" kept their first ingested_ms (1)
    idx.close()
    other.close()


def test_reads_and_changes_write_the_held_ids_first(tmp_path: Path) -> None:
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    record(idx, [("t", "a", 1)], watermark=0)
    assert idx.watermark == 0 and idx.pending == 0
    record(idx, [("t", "b", 1)], watermark=1)
    assert len(idx) == 2
    record(idx, [("t", "c", 1)], watermark=2)
    idx.add_many([("t", "d", 1)], watermark=3)  # written after the held ones: 3 wins
    assert idx.watermark == 3
    record(idx, [("t", "e", 5)], watermark=4)
    assert idx.purge_older_than(2) == 4
    assert idx.contains_many([("t", "e")]) == {("t", "e")}
    record(idx, [("t", "f", 5)], watermark=5)
    idx.reset()  # forgets the held ids too
    assert idx.pending == 0
    assert idx.watermark == -1
    assert idx.contains_many([("t", "e"), ("t", "f")]) == set()
    record(idx, [("t", "g", 5)], watermark=7)
    idx.close()  # a clean close writes them
    again = DedupeIndex.open(tmp_path, "tp", 0)
    assert again.watermark == 7
    assert again.contains_many([("t", "g")]) == {("t", "g")}
    again.close()


def test_a_crash_loses_only_ids_the_watermark_does_not_cover(tmp_path: Path) -> None:
    """Held ids die with the process; the file's watermark still says what it holds, and
    ``rebuild`` reads the rest back from the store."""
    sink = MemorySink()
    sink.commit("tp", envelope_rows("tp", 0, [(0, "a"), (1, "b"), (2, "c")]), [], {0: 2})
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    record(idx, [("t1", "a", 1)], watermark=0)
    idx.flush()
    record(idx, [("t1", "b", 1), ("t1", "c", 1)], watermark=2)  # held when the process dies
    after = DedupeIndex.open(tmp_path, "tp", 0)  # the restarted process: same file
    assert after.watermark == 0
    assert after.contains_many([("t1", "a"), ("t1", "b")]) == {("t1", "a")}
    assert rebuild(after, sink, "tp", 0, 2, now_ms=1_700_000_100_000, horizon_ms=35 * DAY) == 2
    assert after.contains_many([("t1", x) for x in "abc"]) == {("t1", x) for x in "abc"}
    after.close()


def test_a_failed_write_keeps_the_held_ids(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    """A write behind that fails: its ids are held again (and found), its error is raised by
    the next call that waits for it, and the next write takes them with the latest watermark."""
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    idx.pending_max = 2
    real = idx._write_json

    def failing(*args: object) -> int:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(idx, "_write_json", failing)
    record(idx, [("t", "a", 1), ("t", "b", 1)], watermark=4)  # handed to the writer, fails
    assert idx.contains_many([("t", "a"), ("t", "b")]) == {("t", "a"), ("t", "b")}
    with pytest.raises(sqlite3.OperationalError):
        idx.wait_behind()
    assert idx.pending == 2
    assert idx.contains_many([("t", "a"), ("t", "b")]) == {("t", "a"), ("t", "b")}
    record(idx, [("t", "a", 7), ("t", "c", 7)], watermark=5)  # "a" keeps 1; fails again
    with pytest.raises(sqlite3.OperationalError):
        idx.flush()  # waits for the write in flight first: its error, nothing lost
    assert idx.pending == 3
    monkeypatch.setattr(idx, "_write_json", real)
    idx.flush()
    assert idx.pending == 0
    assert idx.watermark == 5
    assert idx.purge_older_than(2) == 2  # a and b (1), not c (7)
    idx.close()


def test_ids_being_written_are_found_and_the_writer_runs_without_the_caller(
    tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    """``record_keys`` hands a full batch to the background thread and returns: lookups find
    its ids meanwhile, and further ids are held until it is done."""
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    idx.pending_max = 2
    gate = threading.Event()
    real = idx._write_json

    def slow(*args: Any) -> int:
        assert gate.wait(10)
        return real(*args)

    monkeypatch.setattr(idx, "_write_json", slow)
    record(idx, [("t", "a", 1), ("t", "b", 1)], watermark=1)  # returns while the write waits
    record(idx, [("t", "c", 1), ("t", "d", 1)], watermark=2)  # held: a write is in flight
    other = DedupeIndex.open(tmp_path, "tp", 0, filter_max_bytes=0)  # reads the file as it is
    assert other.contains_many([("t", "a")]) == set()  # not committed yet
    assert idx.contains_many([("t", x) for x in "abcde"]) == {("t", x) for x in "abcd"}
    assert idx.pending == 4
    gate.set()
    idx.wait_behind()
    assert other.contains_many([("t", x) for x in "abcd"]) == {("t", "a"), ("t", "b")}
    assert other.watermark == 1 and idx.pending == 2
    idx.close()  # writes the held ones
    assert other.watermark == 2 and len(other) == 4
    other.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["record", "add", "flush", "crash", "filter", "refresh", "purge", "reset"]
            ),
            st.lists(st.tuples(st.sampled_from(["t1", "t2"]), st.sampled_from("abcdefgh"))),
        ),
        max_size=12,
    ),
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=1, max_value=8),
    st.sampled_from([0, 1, 4, 1 << 20]),
)
def test_held_ids_behave_like_the_file(
    tmp_path: Path,
    monkeypatch: MonkeyPatch,
    ops: list[tuple[str, list[tuple[str, str]]]],
    pending_max: int,
    recent: int,
    filter_min_ids: int,
) -> None:
    """Whatever the batching and the id filter (none, built or being built, one that outgrows
    its size and is built again larger), ``contains_many`` answers as if every id were written
    at once; after a crash the file holds exactly the ids written, and its watermark is the
    last one written with them."""
    monkeypatch.setattr(dedupe, "FILTER_MIN_IDS", max(filter_min_ids, 1))
    filter_bytes = 0 if filter_min_ids == 0 else dedupe.FILTER_MAX_BYTES
    path = tmp_path / "held.sqlite"
    path.unlink(missing_ok=True)

    def open_index() -> DedupeIndex:
        return DedupeIndex(
            path, "tp", pending_max=pending_max, recent_max=recent, filter_max_bytes=filter_bytes
        )

    idx = open_index()
    known: set[tuple[str, str]] = set()  # every id recorded or added (what contains_many sees)
    on_file: set[tuple[str, str]] = set()
    wm_on_file = -1
    held: set[tuple[str, str]] = set()
    held_wm: int | None = None  # the watermark of the held ids (None: nothing recorded)
    universe = [(t, e) for t in ("t1", "t2") for e in "abcdefgh"]

    def write_held() -> None:
        nonlocal held, held_wm, on_file, wm_on_file
        if held_wm is not None:
            on_file |= held
            wm_on_file = held_wm
        held, held_wm = set(), None

    for wm, (op, keys) in enumerate(ops):
        if op == "record":
            idx.record_keys(list(keys), [1] * len(keys), wm)
            idx.wait_behind()  # a move runs behind: let it end (the model has no timing)
            known |= set(keys)
            held |= set(keys)
            held_wm = wm
            if len(held) >= pending_max:
                write_held()
        elif op == "add":
            idx.add_many(((t, e, 1) for t, e in keys), wm)
            known |= set(keys)
            write_held()
            on_file |= set(keys)
            wm_on_file = wm
        elif op == "flush":
            idx.flush()
            write_held()
        elif op == "filter":  # the filter in use from here on (when there is one)
            assert idx.wait_filter(10) is (filter_bytes > 0)
        elif op == "refresh":  # built again from the file (in the background)
            idx.refresh_filter()
        elif op == "purge":  # every id is older (ingested at 1): the held ones are written first
            idx.purge_older_than(2)
            write_held()
            known, on_file = set(), set()
        elif op == "reset":
            idx.reset()
            known, on_file, wm_on_file = set(), set(), -1
            held, held_wm = set(), None
        else:  # crash: a new process opens the file; the held ids are gone
            idx.wait_behind()  # (a move is one transaction: before or after it, never within)
            idx.wait_filter()
            idx._db.close()
            idx = open_index()
            known = set(on_file)
            held, held_wm = set(), None
        assert idx.pending == len(held)
        assert idx.contains_many(universe) == known
    reader = DedupeIndex(path, "tp")
    assert reader.contains_many(universe) == on_file
    assert reader.watermark == wm_on_file
    reader.close()
    idx.close()


def test_new_files_get_large_pages_and_old_ones_keep_theirs(tmp_path: Path) -> None:
    def page_size(path: Path) -> int:
        db = sqlite3.connect(str(path))
        try:
            return int(db.execute("PRAGMA page_size").fetchone()[0])
        finally:
            db.close()

    new = DedupeIndex.open(tmp_path, "tp", 0)
    new.add_many([("t", "a", 1)], watermark=0)
    new.close()
    assert page_size(index_path(tmp_path, 0)) == PAGE_SIZE
    # a file made by an older version (sqlite's default pages) is used as it is
    old_path = index_path(tmp_path, 1)
    db = sqlite3.connect(str(old_path))
    db.execute("PRAGMA page_size=4096")
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(
        "CREATE TABLE seen (tenant_id TEXT NOT NULL, event_id TEXT NOT NULL, "
        "ingested_ms INTEGER NOT NULL, PRIMARY KEY (tenant_id, event_id)) WITHOUT ROWID;"
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;"
        "INSERT INTO seen VALUES ('t', 'old', 1); INSERT INTO meta VALUES ('wm:tp', 5);"
    )
    db.close()
    old = DedupeIndex.open(tmp_path, "tp", 1)
    assert old.watermark == 5
    old.add_many([("t", "b", 1)], watermark=6)
    assert old.contains_many([("t", "old"), ("t", "b"), ("t", "c")]) == {("t", "old"), ("t", "b")}
    old.close()
    assert page_size(old_path) == 4096


def test_ids_of_any_text_are_found(tmp_path: Path) -> None:
    """Lookups pass the ids as one JSON array (sqlite's ``json_each``), which would cut an id at
    a NUL character: such ids are looked up one by one, and every other text goes through."""
    idx = DedupeIndex(tmp_path / "p.sqlite", "tp")
    odd = ["a\x00b", "\x00", 'q"uo\\te', "é€😀", "tab\tnl\n", " ", "[1]", "null"]
    idx.add_many([("t", e, 1) for e in odd], 0)
    others = [("t", "a\x00c"), ("t", "a"), ("t", "1"), ("u", "null")]
    assert idx.contains_many([("t", e) for e in odd] + others) == {("t", e) for e in odd}
    clean = [e for e in odd if "\x00" not in e]  # the JSON path alone
    assert idx.contains_many([("t", e) for e in clean] + others[1:]) == {("t", e) for e in clean}
    idx.close()


def test_recent_ids_move_into_the_main_table(tmp_path: Path) -> None:
    """Batches go into the small ``recent`` table; once it holds ``recent_max`` ids they are
    moved into ``seen`` in the background. Every id is found before, during and after."""
    path = tmp_path / "p.sqlite"
    idx = DedupeIndex(path, "tp", pending_max=3, recent_max=5)
    ids = [("t", f"e{n}") for n in range(20)]
    for n, key in enumerate(ids):
        idx.record_keys([key], [n], n)
        assert idx.contains_many(ids) == set(ids[: n + 1])
    idx.wait_behind()
    db = sqlite3.connect(str(path))
    in_seen = db.execute("SELECT count(*) FROM seen").fetchone()[0]
    in_recent = db.execute("SELECT count(*) FROM recent").fetchone()[0]
    db.close()
    assert in_seen >= 5 and in_seen + in_recent + idx.pending == 20  # moved, nothing twice
    assert idx.recent == in_recent and idx.entries == in_seen + in_recent
    idx.close()
    again = DedupeIndex(path, "tp")
    assert again.watermark == 19 and len(again) == 20
    assert again.contains_many(ids) == set(ids)
    assert again.purge_older_than(10) == 10  # from both tables
    assert again.contains_many(ids) == set(ids[10:])
    again.close()


def test_a_failed_move_keeps_the_ids_where_they_were(
    tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    idx = DedupeIndex(tmp_path / "p.sqlite", "tp", pending_max=2, recent_max=2)

    def failing() -> int:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(idx, "_move_recent", failing)
    idx.record_keys([("t", "a"), ("t", "b")], [1, 1], 1)  # written, then the move fails behind
    assert idx.contains_many([("t", "a"), ("t", "b")]) == {("t", "a"), ("t", "b")}
    with pytest.raises(sqlite3.OperationalError):
        idx.wait_behind()
    assert idx.recent == 2  # still in ``recent``, found there
    assert idx.contains_many([("t", "a"), ("t", "c")]) == {("t", "a")}
    monkeypatch.undo()
    idx.record_keys([("t", "c"), ("t", "d")], [2, 2], 2)  # the next full write moves them
    idx.wait_behind()
    assert idx.recent == 0 and len(idx) == 4 and idx.watermark == 2
    idx.close()


# --- the id filter in front of the file ----------------------------------------------------------


def _lookups(idx: DedupeIndex) -> list[str]:
    """The statements the index's connection runs from now on."""
    seen: list[str] = []
    idx._db.set_trace_callback(seen.append)
    return seen


def test_new_ids_are_answered_by_the_filter_without_reading_the_file(tmp_path: Path) -> None:
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    idx.add_many([("t", f"old-{n}", 1) for n in range(1000)], watermark=0)
    assert idx._builder is None  # opening and writing build nothing: the first lookup does
    assert idx.wait_filter(10)
    statements = _lookups(idx)
    new = [("t", f"new-{n}") for n in range(1000)]
    # (the filter is planned for FILTER_MIN_IDS: at 1,000 ids a false positive is ~1e-10)
    assert idx.contains_many(new) == set() and statements == []
    assert idx.contains_many([*new, ("t", "old-7")]) == {("t", "old-7")}
    assert len(statements) == 1  # "old-7" alone is asked of the file
    idx.close()
    # without a filter, every lookup reads the file
    bare = DedupeIndex.open(tmp_path, "tp", 0, filter_max_bytes=0)
    statements = _lookups(bare)
    assert bare.contains_many(new) == set() and len(statements) == 1
    assert not bare.wait_filter() and not bare.filter_ready
    bare.close()


def test_ids_recorded_while_the_filter_is_built_are_in_it(
    tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    """The build reads the file in one snapshot; ids recorded after it began (and written to
    the file after that snapshot) come from its backlog."""
    DedupeIndex.open(tmp_path, "tp", 0, filter_max_bytes=0).add_many([("t", "old", 1)], 0)
    in_scan = threading.Event()
    go_on = threading.Event()

    class GatedFilter(dedupe.IdFilter):
        def add(self, keys: Any) -> None:
            if threading.current_thread().name == "tally-dedupe-filter" and not go_on.is_set():
                in_scan.set()
                assert go_on.wait(10)
            super().add(keys)

    monkeypatch.setattr(dedupe, "IdFilter", GatedFilter)
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    assert not idx.filter_ready
    assert idx.contains_many([("t", "old")]) == {("t", "old")}  # from the file; starts a build
    assert in_scan.wait(10) and not idx.filter_ready  # the snapshot is taken: "old" only
    record(idx, [("t", "a", 1), ("t", "b", 1)], watermark=1)
    idx.flush()  # in the file now, after the snapshot
    go_on.set()
    assert idx.wait_filter(10)
    assert idx.contains_many([("t", "a"), ("t", "b"), ("t", "old"), ("t", "c")]) == {
        ("t", "a"),
        ("t", "b"),
        ("t", "old"),
    }
    idx.close()


def test_a_full_filter_grows_by_layers_without_reading_the_file_again(
    tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    monkeypatch.setattr(dedupe, "FILTER_MIN_IDS", 16)
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    assert idx.wait_filter(10)
    builder = idx._builder
    flt = idx._filter
    assert flt is not None and flt.capacity < 100
    ids = [("t", f"e{n}") for n in range(200)]
    for n in range(0, 200, 10):
        idx.add_many([(t, e, 1) for t, e in ids[n : n + 10]], watermark=n)
        assert idx.contains_many(ids) == set(ids[: n + 10])
    assert idx._filter is flt and idx._builder is builder  # the same filter, no second scan
    assert len(flt.layers) > 1 and flt.capacity >= 200
    statements = _lookups(idx)
    assert idx.contains_many([("t", f"x{n}") for n in range(100)]) == set()
    assert len(statements) <= 1  # a false positive or two at most (16 words planned for 16)
    idx.close()


def test_a_file_larger_than_half_the_filter_gets_all_of_it(
    tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    """A first layer within half the bytes leaves room to grow; a file whose ids alone need
    more than that half gets every byte at once (an overfull first layer would answer "maybe"
    for every lookup after it)."""
    monkeypatch.setattr(dedupe, "FILTER_MIN_IDS", 16)
    small = DedupeIndex.open(tmp_path / "small", "tp", 0, filter_max_bytes=1024)
    small.add_many([("t", f"e{n}", 1) for n in range(100)], watermark=0)
    small.refresh_filter()
    assert small.wait_filter(10) and small._filter is not None
    assert small._filter.nbytes <= 512  # planned for 200 ids, within half of 1024 bytes
    small.close()
    big = DedupeIndex.open(tmp_path / "big", "tp", 0, filter_max_bytes=1024)
    ids = [("t", f"e{n}") for n in range(300)]  # 600 bytes at 16 bits per id: more than half
    big.add_many([(t, e, 1) for t, e in ids], watermark=0)
    big.refresh_filter()
    assert big.wait_filter(10) and big._filter is not None
    assert [layer.words.nbytes for layer in big._filter.layers] == [1024]
    assert big.contains_many(ids) == set(ids)
    big.close()


def test_rebuild_refreshes_the_filter_with_the_ids_of_another_writer(tmp_path: Path) -> None:
    """A partition that was elsewhere: its previous owner wrote ids (and their watermark) into
    the file. ``rebuild`` finds the watermark in step with the store (nothing to add) and
    builds the filter again, so those ids are duplicates here too."""
    sink = MemorySink()
    sink.commit("tp", envelope_rows("tp", 0, [(0, "a"), (1, "b")]), [], {0: 1})
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    assert idx.wait_filter(10)
    other = DedupeIndex.open(tmp_path, "tp", 0, filter_max_bytes=0)  # the previous owner
    other.add_many([("t1", "a", 1), ("t1", "b", 1)], watermark=1)
    other.close()
    keys = [("t1", "a"), ("t1", "b"), ("t1", "c")]
    # this object's filter never got them (why a change of owner goes through rebuild)
    assert idx.contains_many(keys) == set()
    assert rebuild(idx, sink, "tp", 0, 1, now_ms=1_700_000_100_000, horizon_ms=35 * DAY) == 0
    assert idx.contains_many(keys) == {("t1", "a"), ("t1", "b")}  # the file, while it builds
    assert idx.wait_filter(10)
    assert idx.contains_many(keys) == {("t1", "a"), ("t1", "b")}
    idx.close()


def test_a_failed_filter_build_leaves_lookups_to_the_file(
    tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    """A build that cannot read the file: no filter (every lookup reads the file), no backlog
    left growing; the next refresh builds one."""
    real = sqlite3.connect

    def broken(path: str, **kw: Any) -> sqlite3.Connection:
        if threading.current_thread().name == "tally-dedupe-filter":
            raise sqlite3.OperationalError("unable to open database file")
        return real(path, **kw)

    monkeypatch.setattr(dedupe.sqlite3, "connect", broken)
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    assert not idx.wait_filter(10) and idx._backlog is None
    record(idx, [("t", "a", 1)], watermark=0)
    idx.flush()
    assert idx._backlog is None
    assert idx.contains_many([("t", "a"), ("t", "b")]) == {("t", "a")}
    monkeypatch.setattr(dedupe.sqlite3, "connect", real)
    idx.refresh_filter()
    assert idx.wait_filter(10)
    assert idx.contains_many([("t", "a"), ("t", "b")]) == {("t", "a")}
    idx.close()
