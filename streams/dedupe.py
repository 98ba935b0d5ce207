"""Exact per-partition dedupe index on local disk: sorted runs of ids (Arrow files), a cache of
ClickHouse.

One index per partition NUMBER, shared by every topic generation: the partition of an event is a
hash of (tenant, id), so all copies of an id land in the same partition number whatever the topic.
This matters in embedded mode, where the in-memory broker gets a new topic at every start
(``tally.events.g<ms>``) and a retry after a crash must still find the id stored by the old
topic. Holds the ``(tenant_id, event_id)`` of every event stored from the partition within the
horizon, with its ``ingested_ms``, and one watermark per topic: the last offset of that topic
whose events are all recorded. Memory stays bounded as ids grow because the ids live on disk.

The index is never the truth: ``rebuild`` brings it in line with the store's progress ``M`` on
partition assignment and when the worker resyncs to another writer's link (re-reading ids with
``W < source_offset <= M`` from the store, or starting over when the store is behind the index,
e.g. after a store reset).

Layout (a log-structured merge of sorted runs). ``partition-N.sqlite`` is the catalog: the
watermarks and the list of runs. A run is an Arrow file in ``partition-N.runs/``, written once
and never changed: the ids of one batch sorted by a 64-bit hash of the event id (``id_hashes``:
CRC-32 and Adler-32 of its UTF-8 bytes), with their tenant, id and ingested_ms. A batch is
written as a new run, whatever the index holds: nothing rewrites a large B-tree (the sqlite
tables this replaced cost 2.8-3.3 us of CPU per id in their inserts and moves at 4-8M ids; runs
cost ~0.65 us to build and write and 0.2-0.3 us in their merges). A run reaches the
catalog, with the watermark of its last link, in ONE sqlite transaction, after its file is
written and synced: the watermark never covers ids that are not in a listed run. A crash
before that leaves a file no run lists (removed at a later open once it is an hour old).

Lookups map the runs into memory (the OS page cache, not the heap) and search their hash columns
(numpy ``searchsorted``, the looked-up ids sorted by hash first) for the ids' hashes; a hash found
is only a candidate: the run's tenant and id at that row are compared, so the answer is exact
whatever the hashes collide. A background thread merges runs of a similar size (``FANIN`` at a
time, into one sorted run; ids in two runs are kept once, with the ingested_ms of the older run)
until runs reach ``MERGED_MAX`` ids, so a lookup searches a few tens of runs at most. A merge swaps
its inputs for its output in one catalog transaction and then deletes their files; mapped files
stay readable after their deletion, and a reader that lists a run whose file is gone reads the
catalog again. Lookups read the catalog again whenever another connection has changed it (sqlite's
``data_version``): other writers of the same partition (a previous owner in another process, a
tool) are seen at the next lookup.

The ids of stored links are written in batches (``record_keys``): they wait in memory, where
``contains_many`` sees them, until ``pending_max`` of them are held; then a background thread
writes them as one run while the worker goes on. Ids being written stay visible to
``contains_many`` in memory until the write is settled. Anything else that reads or changes the
index first waits for the write in flight and writes what is still held, on the caller's
thread. A crash loses only ids the watermark does not cover yet: ``rebuild`` reads them back
from the store. A failed write keeps its ids held (its error is raised by the next call that
settles it), and the next write takes them. A failed merge changes nothing (it is logged; the
next write tries again).

An in-memory id filter (``streams.idfilter``) sits in front of the runs: ``contains_many``
searches the runs only for ids the filter may have got (the real duplicates and ~0.5 % of the
new ids). The filter must hold every id of the index: the index adds each id it records, and
builds the filter from the runs (the runs listed at that moment, plus a backlog of the ids
recorded meanwhile) at the first lookup, again at the first lookup after every ``rebuild`` (the
catalog may list runs another owner of the partition wrote). A full filter grows by a layer
twice the size of its last one (nothing is read again; ``streams.idfilter``). Until one is
built, lookups search the runs for every id. An object that only reads an index another one
writes (tests, tools) opens it with ``filter_max_bytes=0``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import filterfalse
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from streams.idfilter import BITS_PER_ID, IdFilter, words_for

if TYPE_CHECKING:
    from streams.sink import Sink

log = logging.getLogger(__name__)

Key = tuple[str, str]
PENDING_MAX = 50_000  # recorded ids held in memory before they are written (``record_keys``)
FANIN = 4  # runs of one size class merged at once
MERGE_PART = 500_000  # rows per record batch of a merged run (what a merge builds at once)
TIER_BASE = 100_000  # runs below this many ids are of the smallest size class
MERGED_MAX = 750_000  # runs of this many ids or more are not merged again
ORPHAN_AGE_S = 3600.0  # a run file no run lists is removed at open once it is this old
_RETRIES = 5  # catalog reads when listed run files disappear meanwhile (merges elsewhere)
WAL_LIMIT = 16 << 20  # the catalog's write-ahead log is truncated to this after a checkpoint
# The in-memory id filter in front of the runs (``streams.idfilter``): at most this many bytes
# per partition, all its layers (16 bits per id: ~8M ids at its planned false-positive rate,
# more at a higher one); its first layer is planned for twice the ids of the index and at least
# FILTER_MIN_IDS. 0 = no filter.
FILTER_MAX_BYTES = 16 << 20
FILTER_MIN_IDS = 1 << 20
_SCAN_CHUNK = 50_000  # ids per slice while a filter is built from the runs

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    seq     INTEGER PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    ids     INTEGER NOT NULL,
    min_ms  INTEGER NOT NULL,
    max_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""
# the tables of index files before runs (one B-tree of ids and a small one in front of it)
_LEGACY_TABLES = ("recent", "seen")
RUN_SCHEMA = pa.schema(
    [
        ("h", pa.uint64()),
        ("tenant_id", pa.string()),
        ("event_id", pa.string()),
        ("ms", pa.int64()),
    ]
)
_SET_WATERMARK = (
    "INSERT INTO meta (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)


def index_path(directory: Path, partition: int) -> Path:
    """The catalog file of a partition's index (its runs are in ``runs_dir`` of it)."""
    return directory / f"partition-{partition}.sqlite"


def runs_dir(path: Path) -> Path:
    return path.with_suffix(".runs")


def indexed_partitions(directory: Path) -> int | None:
    """1 + the highest partition number with an index file in ``directory`` (None: none)."""
    found = [
        int(f.stem.removeprefix("partition-"))
        for f in directory.glob("partition-*.sqlite")
        if f.stem.removeprefix("partition-").isdigit()
    ]
    return max(found) + 1 if found else None


def _wm(topic: str) -> str:
    return "wm:" + topic


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=60000")
    return db


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction: committed at the end of the block, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def id_hashes(event_ids: Sequence[str]) -> np.ndarray:
    """A 64-bit hash per event id (uint64): CRC-32 of its UTF-8 bytes in the high half, Adler-32
    in the low one. The same in every process and version (Python's own ``hash`` is salted
    per process), C loops over the ids. Only the order of a run and the candidates of a lookup
    come from it: equal hashes are told apart by comparing the ids."""
    raw = list(map(str.encode, event_ids))
    crc = np.fromiter(map(zlib.crc32, raw), dtype=np.uint64, count=len(raw))
    adler = np.fromiter(map(zlib.adler32, raw), dtype=np.uint64, count=len(raw))
    return (crc << np.uint64(32)) | adler


def run_table(held: Mapping[Key, int]) -> pa.Table:
    """The ids ``held`` (key -> ingested_ms) as a run: sorted by ``id_hashes``."""
    if not held:
        return RUN_SCHEMA.empty_table()
    tenants, events = zip(*held, strict=True)
    h = id_hashes(events)
    ms = np.fromiter(held.values(), dtype=np.int64, count=len(h))
    table = pa.table(
        [h, pa.array(tenants, pa.string()), pa.array(events, pa.string()), ms],
        schema=RUN_SCHEMA,
    )
    return table.take(np.argsort(h, kind="stable")).combine_chunks()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunInfo(NamedTuple):
    """A run file written: its name, ids and the range of their ingested_ms."""

    name: str
    ids: int
    min_ms: int
    max_ms: int


def write_run_file(directory: Path, parts: Iterable[pa.Table]) -> RunInfo:
    """Write a run (``parts``: its rows in order, each written as one record batch) as a new
    Arrow file in ``directory``, synced and renamed into place. Not listed anywhere yet: the
    catalog transaction that lists it comes after."""
    name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.arrow"
    tmp = directory / (name + ".tmp")
    ids, lo, hi = 0, 2**63 - 1, -(2**63)
    try:
        with ipc.new_file(str(tmp), RUN_SCHEMA) as writer:
            for part in parts:
                if not part.num_rows:
                    continue
                writer.write_table(part, max_chunksize=part.num_rows)
                ids += part.num_rows
                bounds = pc.min_max(part.column("ms"))
                lo, hi = min(lo, bounds["min"].as_py()), max(hi, bounds["max"].as_py())
        _fsync(tmp)
        tmp.rename(directory / name)
    except BaseException:  # (a disk full): no partial file left behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return RunInfo(name, ids, lo if ids else 0, hi if ids else 0)


class _Run:
    """One run file, mapped into memory: its record batches' hash columns as numpy (each batch
    a sorted stretch of the run), its other columns as Arrow."""

    __slots__ = ("h", "ids", "max_ms", "min_ms", "name", "seq", "table")

    def __init__(self, directory: Path, seq: int, name: str, ids: int, min_ms: int, max_ms: int):
        self.seq, self.name, self.ids, self.min_ms, self.max_ms = seq, name, ids, min_ms, max_ms
        self.table = ipc.open_file(pa.memory_map(str(directory / name))).read_all()
        chunks = self.table.column("h").chunks
        self.h: list[np.ndarray] = [c.to_numpy() for c in chunks]

    def scan_table(self, directory: Path) -> pa.Table:
        """The run's rows through a mapping of their own, for a read of all of them (a filter
        build): the pages read leave the process with it, where through ``table`` they would
        stay mapped as long as the run (its file deleted by a merge meanwhile: ``table``)."""
        try:
            return ipc.open_file(pa.memory_map(str(directory / self.name))).read_all()
        except FileNotFoundError:
            return self.table

    def find(self, hashes: np.ndarray, keys: Sequence[Key]) -> list[Key]:
        """The ``keys`` (whose event ids hash to ``hashes``, sorted ascending) this run holds.
        Sorted queries matter: numpy's binary search starts each one where the previous ended,
        and the run's pages it touches stay in the CPU's caches (about twice as fast as in random
        order; one search instead of two halves it again).
        One search per stretch (the first row whose hash is not below the query's); the rows
        of an equal hash follow it and are compared to the key one by one."""
        found: list[Key] = []
        for c, h in enumerate(self.h):
            n = len(h)
            if not n:
                continue
            lo = np.searchsorted(h, hashes, side="left")
            hits = np.flatnonzero(h[np.minimum(lo, n - 1)] == hashes).tolist()
            if not hits:
                continue
            tenants = self.table.column("tenant_id").chunk(c)
            events = self.table.column("event_id").chunk(c)
            for i in hits:
                tenant, event = keys[i]
                row = int(lo[i])
                while row < n and h[row] == hashes[i]:
                    if events[row].as_py() == event and tenants[row].as_py() == tenant:
                        found.append(keys[i])
                        break
                    row += 1
        return found


def _tier(ids: int) -> int:
    """Size class of a run: runs of one class are merged together."""
    return 0 if ids < TIER_BASE else 1 + int(math.log(ids / TIER_BASE, FANIN))


def merged_parts(tables: Sequence[pa.Table], part_rows: int = MERGE_PART) -> Iterator[pa.Table]:
    """The rows of one run of the ids of ``tables`` (oldest first), ``part_rows`` at a time:
    sorted by hash, an id held by several of them kept once, from the first (the ingested_ms
    the index recorded first). Only the hashes and the order are held whole (16 bytes per id);
    the rows are taken from the (mapped) inputs part by part."""
    table = pa.concat_tables(tables)  # no copy: the inputs' batches
    h = np.concatenate([c.to_numpy() for c in table.column("h").chunks]) if tables else None
    if h is None or not len(h):
        return
    order = np.argsort(h, kind="stable")  # equal hashes keep the order of their runs
    hs = h[order]
    del h
    same = np.flatnonzero(hs[1:] == hs[:-1]) + 1  # sorted rows whose hash is the one before
    if same.size:
        tenants, events = table.column("tenant_id"), table.column("event_id")

        def key(row: int) -> Key:
            src = int(order[row])
            return (tenants[src].as_py(), events[src].as_py())

        rows = same.tolist()
        followers = set(rows)
        drop: list[int] = []
        group_seen: set[Key] = set()
        for row in rows:
            if row - 1 not in followers:  # the first row of a group of equal hashes
                group_seen = {key(row - 1)}
            k = key(row)
            if k in group_seen:
                drop.append(row)
            else:
                group_seen.add(k)
        if drop:
            order = np.delete(order, drop)
    for start in range(0, len(order), part_rows):
        yield table.take(order[start : start + part_rows]).combine_chunks()


def stored_rows(path: Path) -> list[tuple[str, str, int]]:
    """(tenant_id, event_id, ingested_ms) of every row of the runs the catalog at ``path`` lists
    (an id in two runs twice): what the index holds on disk, for tests and tools."""
    db = sqlite3.connect(str(path))
    try:
        names = [r[0] for r in db.execute("SELECT name FROM runs ORDER BY seq")]
    finally:
        db.close()
    rows: list[tuple[str, str, int]] = []
    for name in names:
        table = ipc.open_file(pa.memory_map(str(runs_dir(path) / name))).read_all()
        cols = [table.column(c).to_pylist() for c in ("tenant_id", "event_id", "ms")]
        rows.extend(zip(*cols, strict=True))
    return rows


class _Job(NamedTuple):
    """The background write in flight: ``ids`` (what it writes, still seen by
    ``contains_many``) and ``watermark`` (theirs)."""

    future: Future[int]
    ids: dict[Key, int]
    watermark: int


class DedupeIndex:
    """Seen ids of one partition. Thread-safe: the caller's connection to the catalog behind a
    lock, plus the writer's and the merger's own connections (the writer is the only one that
    adds runs while its job runs: every write of the caller's first waits for that job)."""

    def __init__(
        self,
        path: Path,
        topic: str,
        pending_max: int = PENDING_MAX,
        filter_max_bytes: int = FILTER_MAX_BYTES,
    ) -> None:
        self.path = path
        self.runs_dir = runs_dir(path)
        self.topic = topic  # the topic whose watermark ``watermark``/``add_many`` use
        self.pending_max = pending_max
        # recorded ids not handed to the background thread yet (key -> ingested_ms) and the
        # watermark they move to
        self._pending: dict[Key, int] = {}
        self._pending_wm: int | None = None
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = _connect(path)
        self._db.executescript(_SCHEMA)
        # the runs listed by the catalog, mapped (name -> run), and the catalog's version then
        self._runs: dict[str, _Run] = {}
        self._version = -1
        # the background write in flight, its thread and that thread's connection; the merge
        # in flight, its thread and connection
        self._job: _Job | None = None
        self._behind: ThreadPoolExecutor | None = None
        self._bdb: sqlite3.Connection | None = None
        self._merge: Future[None] | None = None
        self._merger: ThreadPoolExecutor | None = None
        self._mdb: sqlite3.Connection | None = None
        self._closing = False  # no merge starts once set
        self._migrate()
        self._remove_orphans()
        # ids in the runs (an id in two runs, which only a rebuild over recorded ids makes,
        # counts twice until they are merged): read by the worker's metrics
        self.entries = 0
        self._sync_runs(force=True)
        # The id filter (``streams.idfilter``): None until it is built from the runs, which
        # the first lookup starts (lookups search the runs for every id meanwhile).
        # ``_filter_gen`` is bumped by every new build (a build of an older one is dropped);
        # ``_backlog`` collects the ids recorded while one runs (None: no build in flight).
        self.filter_max_bytes = filter_max_bytes
        self._filter: IdFilter | None = None
        self._filter_gen = 0
        self._backlog: list[Key] | None = None
        self._builder: threading.Thread | None = None
        self._build_ok = True  # False after a failed build: none until the next refresh

    @classmethod
    def open(
        cls,
        directory: Path,
        topic: str,
        partition: int,
        filter_max_bytes: int = FILTER_MAX_BYTES,
    ) -> DedupeIndex:
        return cls(index_path(directory, partition), topic, filter_max_bytes=filter_max_bytes)

    # --- the catalog and its runs -----------------------------------------------------------
    def _migrate(self) -> None:
        """An index file of the version before runs (ids in sqlite tables): its ids become
        runs, in one transaction with the tables' removal (the watermarks stay)."""
        db = self._db
        tables = {
            r[0]
            for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if r[0] in _LEGACY_TABLES
        }
        if not tables:
            return
        written: list[RunInfo] = []
        for table in sorted(tables):  # "recent" first: its ids are the newer copies
            cur = db.execute(f"SELECT tenant_id, event_id, ingested_ms FROM {table}")
            while rows := cur.fetchmany(MERGED_MAX):
                held: dict[Key, int] = {}
                deque(
                    map(held.setdefault, [(t, e) for t, e, _ in rows], [m for *_, m in rows]),
                    maxlen=0,
                )
                written.append(write_run_file(self.runs_dir, [run_table(held)]))
        with _immediate(db):
            for info in written:
                self._list_run(db, info)
            for table in tables:
                db.execute(f"DROP TABLE {table}")
        with contextlib.suppress(sqlite3.OperationalError):  # space back, when nobody reads
            db.execute("VACUUM")
        log.info(
            "dedupe index %s: ids of its sqlite tables moved into %d runs", self.path, len(written)
        )

    @staticmethod
    def _list_run(db: sqlite3.Connection, info: RunInfo, seq: int | None = None) -> None:
        db.execute(
            "INSERT INTO runs (seq, name, ids, min_ms, max_ms) VALUES (?, ?, ?, ?, ?)",
            (seq, *info),
        )

    def _remove_orphans(self) -> None:
        """Run files no run lists (a crash between a file and its transaction), an hour old: a
        younger one may be another process's write just before its transaction."""
        listed = {r[0] for r in self._db.execute("SELECT name FROM runs")}
        cutoff = time.time() - ORPHAN_AGE_S
        for f in self.runs_dir.iterdir():
            if f.name not in listed and f.stat().st_mtime < cutoff:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
                log.info("dedupe index %s: removed %s, a run file no run lists", self.path, f.name)

    def _sync_runs(self, force: bool = False) -> None:
        """Map the runs the catalog lists now, if it changed since the last time (lock held, or
        from ``__init__``). A listed file that is gone was merged meanwhile: read again."""
        version = int(self._db.execute("PRAGMA data_version").fetchone()[0])
        if not force and version == self._version:
            return
        for attempt in range(_RETRIES):
            rows = self._db.execute("SELECT seq, name, ids, min_ms, max_ms FROM runs").fetchall()
            runs: dict[str, _Run] = {}
            try:
                for seq, name, ids, min_ms, max_ms in rows:
                    known = self._runs.get(name)
                    runs[name] = known or _Run(self.runs_dir, seq, name, ids, min_ms, max_ms)
            except FileNotFoundError:
                if attempt == _RETRIES - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
                continue
            self._runs = runs
            self._version = version
            self.entries = sum(r.ids for r in runs.values())
            return

    def _commit_run(
        self, db: sqlite3.Connection, held: Mapping[Key, int], watermark: int, topic: str
    ) -> int:
        """One run of ``held`` (if any) listed with the watermark of ``topic``, in one
        transaction after its file is written and synced. Returns the ids written."""
        info = write_run_file(self.runs_dir, [run_table(held)]) if held else None
        try:
            with _immediate(db):
                if info is not None:
                    self._list_run(db, info)
                db.execute(_SET_WATERMARK, (_wm(topic), watermark))
        except BaseException:
            if info is not None:
                with contextlib.suppress(OSError):
                    (self.runs_dir / info.name).unlink()
            raise
        return len(held)

    def close(self) -> None:
        with self._lock:
            self._filter_gen += 1  # a build in flight stops at its next chunk
            builder = self._builder
        if builder is not None:
            builder.join()
        with self._lock:
            self._closing = True
            try:
                self._write_pending()
            finally:
                self._wait_merge()
                for pool in (self._behind, self._merger):
                    if pool is not None:
                        pool.shutdown(wait=True)
                self._behind = self._merger = None
                for db in (self._bdb, self._mdb):
                    if db is not None:
                        db.close()
                self._bdb = self._mdb = None
                self._db.close()

    def wait_behind(self) -> None:
        """Wait for the background write and merge in flight, if any (a failed write's error is
        raised; its ids are held again)."""
        with self._lock:
            self._settle()
            self._wait_merge()

    def flush(self) -> None:
        """Write the recorded ids still held in memory (with their watermark)."""
        with self._lock:
            self._write_pending()

    @property
    def pending(self) -> int:
        """Recorded ids not known to be in the index yet (held, or being written)."""
        job = self._job
        return len(self._pending) + (len(job.ids) if job is not None else 0)

    @property
    def runs(self) -> int:
        """Runs the index searches (as last read from the catalog)."""
        return len(self._runs)

    @property
    def watermark(self) -> int:
        """Last offset of the current topic whose stored ids are all in the index (-1: none)."""
        return self.watermark_of(self.topic)

    def watermark_of(self, topic: str) -> int:
        with self._lock:
            self._write_pending()
            row = self._db.execute(
                "SELECT value FROM meta WHERE name = ?", (_wm(topic),)
            ).fetchone()
        return int(row[0]) if row else -1

    def __len__(self) -> int:
        """Distinct ids in the index (held ones written first)."""
        with self._lock:
            self._write_pending()
            self._sync_runs()
            runs = [r.table for r in self._runs.values() if r.ids]
            if not runs:
                return 0
            keys = pa.concat_tables(runs).select(["tenant_id", "event_id"])
            return int(keys.group_by(["tenant_id", "event_id"]).aggregate([]).num_rows)

    def contains_many(self, keys: Iterable[Key]) -> set[Key]:
        """The subset of ``keys`` present in the index: the held ones from memory, the others
        by the hashes of their event ids in every run (only the filter's candidates)."""
        found: set[Key] = set()
        with self._lock:
            # ids the filter has certainly never got are not in the index: not searched
            flt = self._filter
            if flt is not None:
                keys = flt.maybe(keys if isinstance(keys, Collection) else list(keys))
            else:
                self._start_filter()
            # ids held for the batched write, or being written: found in memory. (The job's
            # ids are dropped from memory only under this lock, once its run is listed.)
            job = self._job
            for held in (self._pending, job.ids if job is not None else None):
                if held:
                    keys = list(keys)
                    hits = list(filter(held.__contains__, keys))
                    if hits:
                        found.update(hits)
                        keys = list(filterfalse(held.__contains__, keys))
            found.update(self._in_runs(keys if isinstance(keys, Sequence) else list(keys)))
        return found

    def _in_runs(self, keys: Sequence[Key]) -> set[Key]:
        """The ``keys`` some run holds (lock held)."""
        found: set[Key] = set()
        if keys:
            self._sync_runs()
            if self._runs:
                hashes = id_hashes([e for _t, e in keys])
                order = np.argsort(hashes)  # searched in order of their hashes (``_Run.find``)
                hashes = hashes[order]
                keys = [keys[i] for i in order.tolist()]
                for run in self._runs.values():
                    found.update(run.find(hashes, keys))
        return found

    def add_many(
        self,
        keys_with_ms: Iterable[tuple[str, str, int]],
        watermark: int,
        topic: str | None = None,
    ) -> None:
        """Record ids (tenant_id, event_id, ingested_ms) as one run and move the watermark of
        ``topic`` (default: the current topic), atomically. An id given twice keeps its first
        ingested_ms; one already in the index keeps its own (it is not written again)."""
        held: dict[Key, int] = {}
        for t, e, ms in keys_with_ms:
            held.setdefault((t, e), ms)
        with self._lock:
            self._write_pending()
            for key in self._in_runs(list(held)):  # already recorded: its ingested_ms stays
                del held[key]
            self._commit_run(self._db, held, watermark, topic or self.topic)
            self._sync_runs(force=True)
            if self._filter is not None or self._backlog is not None:  # else nobody wants them
                self._note(list(held))
            self._maybe_merge()

    def record_keys(self, keys: Sequence[Key], ingested_ms: Sequence[int], watermark: int) -> None:
        """``add_many`` for the current topic, batched: the ids ``keys[i]`` ingested at
        ``ingested_ms[i]`` (parallel columns, as the worker has them: no tuple is built per id
        here) are held in memory (seen by ``contains_many``) and, once ``pending_max`` ids are
        held, written with ``watermark`` as one run by the background thread; the index is read
        or changed otherwise (``flush``, ``close``, ``watermark``...) only after they are
        written. An id already held keeps its first ingested_ms. The error of a failed write
        is raised by the next call that waits for it; its ids are held again (the next write
        takes them)."""
        if len(keys) != len(ingested_ms):
            raise ValueError("record_keys: keys and ingested_ms differ in length")
        with self._lock:
            pending = self._pending
            # setdefault keeps the first ingested_ms of an id already held; the loop runs in C
            deque(map(pending.setdefault, keys, ingested_ms), maxlen=0)
            self._pending_wm = watermark
            self._note(keys)
            if len(pending) < self.pending_max:
                return
            job = self._job
            if job is not None and not job.future.done() and len(pending) < 4 * self.pending_max:
                return  # handed over once the job in flight is done
            self._settle()
            self._write_behind(watermark)

    def _write_behind(self, wm: int) -> None:
        """Hand the held ids and their watermark ``wm`` to the background thread (lock held,
        nothing in flight): one run."""
        pending = self._pending
        if self._behind is None:
            self._behind = ThreadPoolExecutor(1, thread_name_prefix="tally-dedupe-write")
        future = self._behind.submit(self._write_job, pending, wm, self.topic)
        self._job = _Job(future, pending, wm)
        self._pending = {}
        self._pending_wm = None

    def _write_job(self, held: dict[Key, int], watermark: int, topic: str) -> int:
        """(background thread) The held ids as one run, listed with their watermark."""
        if self._bdb is None:
            self._bdb = _connect(self.path)
        return self._commit_run(self._bdb, held, watermark, topic)

    def _settle(self) -> None:
        """Wait for the background write in flight (lock held) and account for it: its run is
        mapped before its ids leave memory. A failed write puts its ids back among the held
        ones (before them: theirs are the first ingested_ms); its error is logged and raised."""
        job = self._job
        if job is None:
            return
        self._job = None
        try:
            job.future.result()
        except Exception as exc:
            held = job.ids
            deque(map(held.setdefault, self._pending, self._pending.values()), maxlen=0)
            self._pending = held
            if self._pending_wm is None:
                self._pending_wm = job.watermark
            log.warning("dedupe index %s: writing recorded ids failed: %r", self.path, exc)
            raise
        self._sync_runs(force=True)
        self._maybe_merge()

    def _write_pending(self) -> None:
        """Write the held ids and their watermark on this thread, after the job in flight (lock
        held). On failure they stay held."""
        self._settle()
        if self._pending_wm is None:
            return
        self._commit_run(self._db, self._pending, self._pending_wm, self.topic)
        self._pending = {}
        self._pending_wm = None
        self._sync_runs(force=True)
        self._maybe_merge()

    # --- merges -----------------------------------------------------------------------------
    def _maybe_merge(self) -> None:
        """Start merging the runs of the smallest size class that has ``FANIN`` of them, if no
        merge is in flight (lock held)."""
        if self._closing or (self._merge is not None and not self._merge.done()):
            return
        if self._merge is not None:  # done: its swap is in the catalog, read it first
            self._merge = None
            self._sync_runs()
        classes: dict[int, list[_Run]] = {}
        for run in self._runs.values():
            if run.ids < MERGED_MAX:
                classes.setdefault(_tier(run.ids), []).append(run)
        for tier in sorted(classes):
            group = classes[tier]
            if len(group) >= FANIN:
                group.sort(key=lambda r: r.seq)
                if self._merger is None:
                    self._merger = ThreadPoolExecutor(1, thread_name_prefix="tally-dedupe-merge")
                self._merge = self._merger.submit(self._merge_job, group)
                return

    def _wait_merge(self) -> None:
        """Wait for the merge in flight (lock held); a failed one was logged by itself."""
        merge = self._merge
        if merge is not None:
            with contextlib.suppress(Exception):
                merge.result()
            self._merge = None
            self._sync_runs()

    def _merge_job(self, group: list[_Run]) -> None:
        """(merge thread) One run of ``group``'s ids, swapped for them in one transaction (if
        the catalog still lists all of them: else another writer merged or purged them, and
        this run is dropped); then their files are deleted. Errors are logged: the runs stay."""
        info = None
        try:
            if self._mdb is None:
                self._mdb = _connect(self.path)
            db = self._mdb
            info = write_run_file(self.runs_dir, merged_parts([r.table for r in group]))
            seqs = [r.seq for r in group]
            with _immediate(db):
                marks = ",".join("?" * len(seqs))
                gone = db.execute(f"DELETE FROM runs WHERE seq IN ({marks})", seqs).rowcount
                if gone != len(seqs):
                    raise RuntimeError("the runs to merge changed meanwhile")
                self._list_run(db, info, seq=min(seqs))
            info = None
            for r in group:
                with contextlib.suppress(FileNotFoundError):
                    (self.runs_dir / r.name).unlink()
        except Exception as exc:
            log.warning("dedupe index %s: merging %d runs failed: %r", self.path, len(group), exc)
            if info is not None:
                with contextlib.suppress(OSError):
                    (self.runs_dir / info.name).unlink()

    # --- horizon and reset ------------------------------------------------------------------
    def purge_older_than(self, ms: int) -> int:
        """Forget ids ingested before ``ms`` (the horizon). Returns how many were removed.
        A run whose ids are all older goes; one with some older ones is rewritten without them
        (its file replaced in one transaction)."""
        with self._lock:
            self._write_pending()
            self._wait_merge()
            self._sync_runs(force=True)
            removed = 0
            for run in sorted(self._runs.values(), key=lambda r: r.seq):
                if run.min_ms >= ms:
                    continue
                kept = run.table.filter(pc.greater_equal(run.table.column("ms"), ms))
                info = write_run_file(self.runs_dir, [kept]) if kept.num_rows else None
                try:
                    with _immediate(self._db):
                        self._db.execute("DELETE FROM runs WHERE seq = ?", (run.seq,))
                        if info is not None:
                            self._list_run(self._db, info, seq=run.seq)
                except BaseException:
                    if info is not None:
                        with contextlib.suppress(OSError):
                            (self.runs_dir / info.name).unlink()
                    raise
                with contextlib.suppress(FileNotFoundError):
                    (self.runs_dir / run.name).unlink()
                removed += run.ids - kept.num_rows
            self._sync_runs(force=True)
            return removed

    def reset(self) -> None:
        """Forget everything (watermark back to -1), the held ids too."""
        with self._lock:
            with contextlib.suppress(Exception):  # logged; forgotten anyway
                self._settle()
            self._wait_merge()
            self._pending = {}
            self._pending_wm = None
            with _immediate(self._db):
                names = [r[0] for r in self._db.execute("SELECT name FROM runs")]
                self._db.execute("DELETE FROM runs")
                self._db.execute("DELETE FROM meta")
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    (self.runs_dir / name).unlink()
            self._sync_runs(force=True)
            if self.filter_max_bytes > 0:  # the index is empty: so is its filter
                self._filter_gen += 1
                self._backlog = None
                self._build_ok = True
                self._filter = IdFilter(self._first_words(0), self.filter_max_bytes)

    # --- the id filter ----------------------------------------------------------------------
    @property
    def filter_ready(self) -> bool:
        return self._filter is not None

    def wait_filter(self, timeout: float | None = None) -> bool:
        """Build the filter now if there is none (and none is being built), and wait until no
        build is in flight (one may start the next); True when a filter is in use."""
        with self._lock:
            if self._filter is None:
                self._start_filter()
        deadline = None if timeout is None else time.monotonic() + timeout
        while (builder := self._builder) is not None and builder.is_alive():
            builder.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if deadline is not None and time.monotonic() >= deadline:
                break
        return self._filter is not None

    def refresh_filter(self) -> None:
        """Drop the filter: the next lookup builds it again from the runs (in the background;
        meanwhile lookups search the runs for every id). For when the index may hold ids this
        object did not record: another process wrote it while the partition was elsewhere. ``rebuild`` calls
        it; the build waits for the first flush, not on the partition's assignment."""
        with self._lock:
            self._filter_gen += 1  # a build in flight is dropped
            self._filter = None
            self._backlog = None
            self._build_ok = True

    def _start_filter(self) -> None:
        """Start building a filter if there is none, none is being built and none failed since
        the last refresh (lock held)."""
        if self.filter_max_bytes > 0 and self._backlog is None and self._build_ok:
            self._build_filter()

    def _note(self, keys: Sequence[Key]) -> None:
        """Ids recorded (lock held): into the filter (a full one grows by a layer), and into
        the backlog of the build in flight."""
        flt = self._filter
        if flt is not None:
            flt.add(keys)
        if self._backlog is not None:
            self._backlog.extend(keys)

    def _build_filter(self) -> None:
        """Start building a filter of every id of the runs and of those held (lock held)."""
        self._filter_gen += 1
        self._filter = None
        job = self._job
        # held ids (in a run or not by the time the build reads them) and, from now on, every
        # recorded id: with the ids of the runs listed now, nothing is left out
        self._backlog = [*self._pending, *(job.ids if job is not None else ())]
        self._sync_runs()
        runs = list(self._runs.values())
        self._builder = threading.Thread(
            target=self._build,
            args=(self._filter_gen, self._first_words(self.entries + len(self._backlog)), runs),
            name="tally-dedupe-filter",
            daemon=True,
        )
        self._builder.start()

    def _first_words(self, ids: int) -> int:
        """Words of a new filter's first layer for ``ids`` known ids: planned for twice as many
        and at least FILTER_MIN_IDS, within half the filter's bytes (room to grow); a file
        whose ids alone need more than that half gets all of them (an overfull first layer
        answers "maybe" often whatever its successors hold: 16M ids in 8 MB, ~18 %)."""
        half = self.filter_max_bytes // 2
        if ids * BITS_PER_ID // 8 > half:
            return words_for(2 * ids, self.filter_max_bytes)
        return words_for(max(FILTER_MIN_IDS, 2 * ids), half)

    def _build(self, gen: int, words: int, runs: list[_Run]) -> None:
        """(builder thread) Read the ids of ``runs`` (mapped: readable even once merged away)
        into a new filter; install it with the backlog unless a newer build or a close came
        meanwhile."""
        started = time.perf_counter()
        flt = IdFilter(words, self.filter_max_bytes)
        try:
            for run in runs:
                table = run.scan_table(self.runs_dir)
                for start in range(0, run.ids, _SCAN_CHUNK):
                    if self._filter_gen != gen:
                        return
                    part = table.slice(start, _SCAN_CHUNK)
                    tenants = part.column("tenant_id").to_pylist()
                    events = part.column("event_id").to_pylist()
                    flt.add(list(zip(tenants, events, strict=True)))
        except Exception as exc:
            with self._lock:
                if self._filter_gen == gen:  # no backlog left growing
                    self._backlog = None
                    self._build_ok = False
            log.warning(
                "dedupe index %s: building its id filter failed (lookups search the runs): %r",
                self.path,
                exc,
            )
            return
        with self._lock:
            if self._filter_gen != gen:
                return
            flt.add(self._backlog or [])
            self._backlog = None
            self._filter = flt
        log.info(
            "dedupe index %s: id filter of %d ids, %.1f MB, built in %.2f s",
            self.path,
            flt.added,
            flt.nbytes / 2**20,
            time.perf_counter() - started,
        )


def rebuild(
    index: DedupeIndex,
    sink: Sink,
    topic: str,
    partition: int,
    store_progress: int,
    now_ms: int,
    horizon_ms: int,
) -> int:
    """Bring ``index`` in line with the store's progress for the partition, for every topic.

    For each topic ``X`` with stored progress ``M_X`` (``topic`` itself has ``store_progress``):
    ``W_X < M_X``: add the ids the store holds with ``W_X < offset <= M_X`` (ingested within the
    horizon). ``W_X > M_X`` for any topic: the store is behind the index (reset store), so start
    over from -1 for all topics. Rebuilt ids are recorded with ``ingested_ms = now_ms`` (the store
    query does not return it; this keeps them at least a full horizon, never less).
    Returns the number of ids added.
    """
    targets = {x: offs[partition] for x, offs in sink.progress_all().items() if partition in offs}
    targets[topic] = store_progress
    if any(index.watermark_of(x) > m for x, m in targets.items()):
        log.warning("dedupe index of partition %d is ahead of the store: rebuilding", partition)
        index.reset()
    added = 0
    for x, m in sorted(targets.items()):
        w = index.watermark_of(x)
        if w == m:
            continue
        if m >= 0:
            for chunk in sink.seen_ids(x, partition, w, m, now_ms - horizon_ms):
                index.add_many(((t, e, now_ms) for t, e in chunk), w, topic=x)
                added += len(chunk)
        index.add_many((), m, topic=x)
        log.info(
            "dedupe index of %s[%d] rebuilt: %d ids, offsets %d..%d", x, partition, added, w, m
        )
    # Last: the next build's scan then sees every id written before (by this rebuild, or by the
    # partition's previous owner, whose late writes hold ids of offsets <= M that the rebuild
    # read from the store unless the watermark it read covered them already).
    index.refresh_filter()
    return added
