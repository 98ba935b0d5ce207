"""The local dedupe index (a sqlite catalog and Arrow runs in a tmp dir; no broker, no
ClickHouse)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from _pytest.monkeypatch import MonkeyPatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams import dedupe
from streams.dedupe import DedupeIndex, index_path, rebuild
from streams.idfilter import IdFilter
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
    """The write behind the flushes (one run, sorted by the ids' hashes) puts every recorded id
    on disk once, with the ingested_ms it was first recorded with."""
    path = tmp_path / "runs.sqlite"
    path.unlink(missing_ok=True)
    idx = DedupeIndex(path, "tp", pending_max=1)
    first: dict[tuple[str, str], int] = {}
    for t, e, ms in rows:
        first.setdefault((t, e), ms)
    record(idx, rows, watermark=3)  # one batch, handed to the background thread at once
    idx.wait_behind()
    assert idx.pending == 0
    on_file = dedupe.stored_rows(path)
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
    real = idx._write_job

    def failing(*args: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(idx, "_write_job", failing)
    record(idx, [("t", "a", 1), ("t", "b", 1)], watermark=4)  # handed to the writer, fails
    assert idx.contains_many([("t", "a"), ("t", "b")]) == {("t", "a"), ("t", "b")}
    with pytest.raises(OSError):
        idx.wait_behind()
    assert idx.pending == 2
    assert idx.contains_many([("t", "a"), ("t", "b")]) == {("t", "a"), ("t", "b")}
    record(idx, [("t", "a", 7), ("t", "c", 7)], watermark=5)  # "a" keeps 1; fails again
    with pytest.raises(OSError):
        idx.flush()  # waits for the write in flight first: its error, nothing lost
    assert idx.pending == 3
    monkeypatch.setattr(idx, "_write_job", real)
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
    real = idx._write_job

    def slow(*args: Any) -> int:
        assert gate.wait(10)
        return real(*args)

    monkeypatch.setattr(idx, "_write_job", slow)
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
    st.integers(min_value=2, max_value=4),
    st.sampled_from([0, 1, 4, 1 << 20]),
)
def test_held_ids_behave_like_the_file(
    tmp_path: Path,
    monkeypatch: MonkeyPatch,
    ops: list[tuple[str, list[tuple[str, str]]]],
    pending_max: int,
    fanin: int,
    filter_min_ids: int,
) -> None:
    """Whatever the batching, the merges of runs and the id filter (none, built or being built, one that outgrows
    its size and is built again larger), ``contains_many`` answers as if every id were written
    at once; after a crash the file holds exactly the ids written, and its watermark is the
    last one written with them."""
    monkeypatch.setattr(dedupe, "FILTER_MIN_IDS", max(filter_min_ids, 1))
    # runs of 1-2 ids merged ``fanin`` at a time, up to runs of 8 ids
    monkeypatch.setattr(dedupe, "FANIN", fanin)
    monkeypatch.setattr(dedupe, "TIER_BASE", 2)
    monkeypatch.setattr(dedupe, "MERGED_MAX", 8)
    filter_bytes = 0 if filter_min_ids == 0 else dedupe.FILTER_MAX_BYTES
    path = tmp_path / "held.sqlite"
    path.unlink(missing_ok=True)

    def open_index() -> DedupeIndex:
        return DedupeIndex(path, "tp", pending_max=pending_max, filter_max_bytes=filter_bytes)

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
            idx.wait_behind()  # a merge runs behind: let it end (the model has no timing)
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
            idx.wait_behind()  # (a merge is one transaction: before or after it, never within)
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


def test_an_index_file_of_the_version_before_runs_is_moved_into_runs(tmp_path: Path) -> None:
    """A file whose ids are in sqlite tables (``seen``, ``recent``): opened, its ids become
    runs with their ingested_ms, its watermarks stay and the tables are gone."""
    old_path = index_path(tmp_path, 1)
    db = sqlite3.connect(str(old_path))
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(
        "CREATE TABLE seen (tenant_id TEXT NOT NULL, event_id TEXT NOT NULL, "
        "ingested_ms INTEGER NOT NULL, PRIMARY KEY (tenant_id, event_id)) WITHOUT ROWID;"
        "CREATE TABLE recent (tenant_id TEXT NOT NULL, event_id TEXT NOT NULL, "
        "ingested_ms INTEGER NOT NULL, PRIMARY KEY (tenant_id, event_id)) WITHOUT ROWID;"
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;"
        "INSERT INTO seen VALUES ('t', 'old', 1), ('u', 'old', 2);"
        "INSERT INTO recent VALUES ('t', 'new', 3); INSERT INTO meta VALUES ('wm:tp', 5);"
    )
    db.close()
    old = DedupeIndex.open(tmp_path, "tp", 1)
    assert old.watermark == 5
    assert sorted(dedupe.stored_rows(old_path)) == [
        ("t", "new", 3),
        ("t", "old", 1),
        ("u", "old", 2),
    ]
    old.add_many([("t", "b", 1)], watermark=6)
    assert old.contains_many([("t", "old"), ("t", "new"), ("t", "b"), ("t", "c")]) == {
        ("t", "old"),
        ("t", "new"),
        ("t", "b"),
    }
    old.close()
    db = sqlite3.connect(str(old_path))
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert tables == {"runs", "meta"}


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


def test_runs_are_merged_and_every_id_is_found_meanwhile(
    tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    """Every batch is a run; ``FANIN`` runs of a size class are merged in the background into
    one (an id in several kept once, with its first ingested_ms), up to ``MERGED_MAX`` ids. Every
    id is found before, during and after; merged files are deleted."""
    monkeypatch.setattr(dedupe, "FANIN", 2)
    monkeypatch.setattr(dedupe, "TIER_BASE", 4)
    monkeypatch.setattr(dedupe, "MERGED_MAX", 8)
    path = tmp_path / "p.sqlite"
    idx = DedupeIndex(path, "tp", pending_max=3)
    ids = [("t", f"e{n}") for n in range(20)]
    for n, key in enumerate(ids):
        idx.record_keys([key], [n], n)
        assert idx.contains_many(ids) == set(ids[: n + 1])
    idx.add_many([("t", "e0", 99), ("t", "e19", 99)], 19)  # present: kept with their own ms
    idx.flush()
    idx.wait_behind()
    rows = dedupe.stored_rows(path)
    assert sorted(rows) == sorted((t, e, int(e[1:])) for t, e in ids)  # nothing twice
    assert idx.entries == 20 and idx.runs < 7  # 7 batches of 3 or fewer ids, merged
    files = sorted(f.name for f in dedupe.runs_dir(path).iterdir())
    assert len(files) == idx.runs  # the merged ones are gone
    idx.close()
    again = DedupeIndex(path, "tp")
    assert again.watermark == 19 and len(again) == 20
    assert again.contains_many(ids) == set(ids)
    assert again.purge_older_than(10) == 10  # from every run
    assert again.contains_many(ids) == set(ids[10:])
    again.close()


def test_another_reader_follows_the_writes_and_merges(
    tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    """A second index object on the same files (another process, a tool) sees every run once
    it is listed, while the writer's merges swap runs and delete their files behind it."""
    monkeypatch.setattr(dedupe, "FANIN", 2)
    monkeypatch.setattr(dedupe, "TIER_BASE", 2)
    monkeypatch.setattr(dedupe, "MERGED_MAX", 64)
    path = tmp_path / "p.sqlite"
    writer = DedupeIndex(path, "tp", filter_max_bytes=0)
    reader = DedupeIndex(path, "tp", filter_max_bytes=0)
    ids = [("t", f"e{n}") for n in range(40)]
    for n, key in enumerate(ids):
        writer.add_many([(*key, n)], n)
        assert reader.contains_many(ids) == set(ids[: n + 1])
    writer.wait_behind()
    assert reader.contains_many(ids) == set(ids) and reader.watermark == 39
    assert writer.runs < 10 and len(list(dedupe.runs_dir(path).iterdir())) == writer.runs
    reader.close()
    writer.close()


def test_a_run_merged_away_while_it_is_listed_is_read_again(
    tmp_path: Path, monkeypatch: MonkeyPatch
) -> None:
    """A reader lists a run whose file a merge deletes before the reader maps it: it reads the
    catalog again (and then finds the merged run)."""
    path = tmp_path / "p.sqlite"
    writer = DedupeIndex(path, "tp", filter_max_bytes=0)
    writer.add_many([("t", "a", 1)], 0)
    real = dedupe._Run
    gone: list[str] = []

    def merged_meanwhile(*args: Any) -> Any:
        if not gone:
            gone.append(args[2])
            raise FileNotFoundError(args[2])
        return real(*args)

    monkeypatch.setattr(dedupe, "_Run", merged_meanwhile)
    reader = DedupeIndex(path, "tp", filter_max_bytes=0)
    assert gone and reader.contains_many([("t", "a"), ("t", "b")]) == {("t", "a")}
    reader.close()
    writer.close()


def test_merged_parts_keep_each_id_once_with_its_first_ingested_ms(
    monkeypatch: MonkeyPatch,
) -> None:
    """A merge of runs (oldest first): sorted by hash, an id in several runs kept from the
    first, ids that share a hash (here: all) told apart; the rows come part by part."""
    for hashes in (dedupe.id_hashes, lambda ids: np.full(len(ids), 7, dtype=np.uint64)):
        monkeypatch.setattr(dedupe, "id_hashes", hashes)
        older = dedupe.run_table({("t", "a"): 1, ("t", "b"): 1, ("u", "c"): 1})
        newer = dedupe.run_table({("t", "a"): 5, ("u", "a"): 5, ("t", "c"): 5, ("u", "c"): 5})
        parts = list(dedupe.merged_parts([older, newer], part_rows=2))
        assert [p.num_rows for p in parts] == [2, 2, 1]
        merged = pa.concat_tables(parts)
        rows = list(
            zip(
                *(merged.column(c).to_pylist() for c in ("tenant_id", "event_id", "ms")),
                strict=True,
            )
        )
        assert sorted(rows) == [
            ("t", "a", 1),
            ("t", "b", 1),
            ("t", "c", 5),
            ("u", "a", 5),
            ("u", "c", 1),
        ]
        h = merged.column("h").to_numpy()
        assert (h[1:] >= h[:-1]).all()


def test_a_run_file_no_run_lists_is_removed_once_it_is_old(tmp_path: Path) -> None:
    """A crash between a run's file and its transaction leaves a file no run lists: removed at
    an open once an hour old (a younger one may be another writer's, just before its
    transaction); what the catalog lists stays."""
    path = tmp_path / "p.sqlite"
    idx = DedupeIndex(path, "tp")
    idx.add_many([("t", "a", 1)], 0)
    idx.close()
    runs = dedupe.runs_dir(path)
    listed = {f.name for f in runs.iterdir()}
    old, young = runs / "1-1-old.arrow", runs / "2-2-young.arrow.tmp"
    old.write_bytes(b"torn")
    young.write_bytes(b"torn")
    an_hour_ago = time.time() - dedupe.ORPHAN_AGE_S - 1
    os.utime(old, (an_hour_ago, an_hour_ago))
    again = DedupeIndex(path, "tp")
    assert {f.name for f in runs.iterdir()} == listed | {young.name}
    assert again.contains_many([("t", "a"), ("t", "b")]) == {("t", "a")}
    again.close()


def test_ids_whose_hashes_collide_are_told_apart(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    """The runs are searched by a hash of the event id; a hash found is compared by its ids, so
    ids with one hash (here: every id) are still found exactly, merged included."""

    def one_hash(event_ids: Any) -> np.ndarray:
        return np.full(len(event_ids), 7, dtype=np.uint64)

    monkeypatch.setattr(dedupe, "id_hashes", one_hash)
    monkeypatch.setattr(dedupe, "FANIN", 2)
    monkeypatch.setattr(dedupe, "TIER_BASE", 4)
    idx = DedupeIndex(tmp_path / "p.sqlite", "tp", filter_max_bytes=0)
    idx.add_many([("t", "a", 1), ("u", "b", 1)], 0)
    idx.add_many([("t", "b", 2), ("t", "a", 3)], 1)  # ("t", "a") present: not written again
    idx.add_many([("u", "a", 4)], 2)
    idx.wait_behind()
    keys = [(t, e) for t in "tuv" for e in "abc"]
    assert idx.contains_many(keys) == {("t", "a"), ("u", "b"), ("t", "b"), ("u", "a")}
    assert len(idx) == 4
    idx.close()


def test_a_failed_merge_keeps_the_runs(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    monkeypatch.setattr(dedupe, "FANIN", 2)
    path = tmp_path / "p.sqlite"
    idx = DedupeIndex(path, "tp", pending_max=2)
    real = dedupe.merged_parts

    def failing(*args: Any) -> Any:  # fails while the merged run's file is being written
        raise OSError(28, "No space left on device")
        yield

    monkeypatch.setattr(dedupe, "merged_parts", failing)
    idx.record_keys([("t", "a"), ("t", "b")], [1, 1], 1)
    idx.record_keys([("t", "c"), ("t", "d")], [1, 1], 2)
    idx.flush()  # two runs: their merge fails behind
    idx.wait_behind()  # logged, not raised: the runs are all there
    assert idx.runs == 2 and len(list(dedupe.runs_dir(path).iterdir())) == 2  # no partial file
    assert idx.contains_many([("t", "a"), ("t", "d"), ("t", "e")]) == {("t", "a"), ("t", "d")}
    monkeypatch.setattr(dedupe, "merged_parts", real)
    idx.record_keys([("t", "e"), ("t", "f")], [2, 2], 3)  # the next write tries again
    idx.wait_behind()
    assert idx.runs == 1 and len(idx) == 6 and idx.watermark == 3
    assert len(list(dedupe.runs_dir(path).iterdir())) == 1
    idx.close()


# --- the id filter in front of the file ----------------------------------------------------------


def _lookups(idx: DedupeIndex) -> list[int]:
    """From now on, the number of ids of every search of the index's runs."""
    seen: list[int] = []
    real = idx._in_runs

    def spy(keys: Any) -> Any:
        if keys:
            seen.append(len(keys))
        return real(keys)

    idx._in_runs = spy  # type: ignore[method-assign]
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
    assert statements == [1]  # "old-7" alone is searched for in the runs
    idx.close()
    # without a filter, every lookup searches the runs
    bare = DedupeIndex.open(tmp_path, "tp", 0, filter_max_bytes=0)
    statements = _lookups(bare)
    assert bare.contains_many(new) == set() and statements == [1000]
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
    """A build that cannot read the runs: no filter (every lookup searches the runs), no
    backlog left growing; the next refresh builds one."""

    class Broken(IdFilter):
        def add(self, keys: Any) -> None:
            if threading.current_thread().name == "tally-dedupe-filter":
                raise OSError(5, "Input/output error")
            super().add(keys)

    monkeypatch.setattr(dedupe, "IdFilter", Broken)
    idx = DedupeIndex.open(tmp_path, "tp", 0)
    idx.add_many([("t", "z", 1)], watermark=0)
    assert not idx.wait_filter(10) and idx._backlog is None
    record(idx, [("t", "a", 1)], watermark=1)
    idx.flush()
    assert idx._backlog is None
    assert idx.contains_many([("t", "a"), ("t", "b"), ("t", "z")]) == {("t", "a"), ("t", "z")}
    monkeypatch.setattr(dedupe, "IdFilter", IdFilter)
    idx.refresh_filter()
    assert idx.wait_filter(10)
    assert idx.contains_many([("t", "a"), ("t", "b"), ("t", "z")]) == {("t", "a"), ("t", "z")}
    idx.close()
