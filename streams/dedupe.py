"""Exact per-partition dedupe index on local disk (sqlite3, WAL), a cache of ClickHouse.

One file per partition NUMBER, shared by every topic generation: the partition of an event is a
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

The ids of stored links are written in batches (``record_keys``): they wait in memory, where
``contains_many`` sees them, until ``pending_max`` of them are held; then a background thread
writes them to the file in one transaction with the watermark of the last link, while the
worker goes on (a write of 50,000 ids takes ~0.2-0.3 s, which every tenth flush used to wait
for). The write is ONE statement (the ids as one JSON array, ``json_each``, sorted by sqlite):
sqlite runs it without Python's interpreter lock, where ``executemany`` would take the lock back
for every row and queue behind the worker's threads. Ids being written stay visible to
``contains_many`` in memory until the write is settled. Anything else that reads or changes the
index first waits for the write in flight and writes what is still held, on the caller's
thread. A crash loses only ids the watermark does not cover yet: ``rebuild`` reads them back
from the store. A failed write keeps its ids held (its error is raised by the next call that
settles it), and the next write takes them.

An in-memory id filter (``streams.idfilter``) sits in front of the file: ``contains_many`` asks
the file only about ids the filter may have got (the real duplicates and ~0.5 % of the new
ids), where a lookup in the file costs 3-7 us per id and grows with it. The filter must hold
every id of the file: the index adds each id it records, and builds the filter from the file
(one read snapshot in a background thread, plus a backlog of the ids recorded meanwhile) at the
first lookup, again at the first lookup after every ``rebuild`` (the file may hold ids another
owner of the partition wrote). A full filter grows by a layer twice the size of its last one
(nothing is read again; ``streams.idfilter``). Until one is built, lookups ask the file about
every id. An object that only reads a file another one writes (tests, tools) opens it with
``filter_max_bytes=0``.

Two tables, like a small log-structured tree: with event ids spread at random, a batch touches
most leaf pages of the B-tree it goes into, so a write costs about the size of that table, not
of the batch. Batches therefore go into ``recent``, which stays small (``recent_max`` ids), and a
lookup searches both tables. Once ``recent`` is full, the same background thread moves its ids
into ``seen`` right after the write that filled it, in one transaction of ONE statement
(``INSERT ... SELECT`` + ``DELETE``) over its own connection; WAL lets lookups read meanwhile
(before the move commits they find the ids in ``recent``, after it in ``seen``). While that
thread works, newly recorded ids are held in memory (up to ``4 x pending_max``, then recording
waits for it). The move changes no watermark: the set of ids in the file is the same before and
after it.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import filterfalse
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import orjson

from streams.idfilter import BITS_PER_ID, IdFilter, words_for

if TYPE_CHECKING:
    from streams.sink import Sink

log = logging.getLogger(__name__)

Key = tuple[str, str]
_CHUNK = 8000  # ids per IN (...) query, below sqlite's 32766 variable limit
PENDING_MAX = 50_000  # recorded ids held in memory before they are written (``record_keys``)
# Pages of new index files. A batch of random ids touches most leaf pages of the B-tree, and the
# cost of a write goes with the number of pages more than with their bytes: 64 KiB pages write
# a batch 1.56x cheaper than sqlite's default 4 KiB at 3-6M ids (``benchmarks.dedupe_index``).
PAGE_SIZE = 65_536
WAL_LIMIT = 64 << 20  # the write-ahead log is truncated to this after a checkpoint
RECENT_MAX = 1_000_000  # ids in ``recent`` before they are moved into ``seen``
# The in-memory id filter in front of the file (``streams.idfilter``): at most this many bytes
# per partition, all its layers (16 bits per id: ~8M ids at its planned false-positive rate,
# more at a higher one); its first layer is planned for twice the ids of the file and at least
# FILTER_MIN_IDS. 0 = no filter.
FILTER_MAX_BYTES = 16 << 20
FILTER_MIN_IDS = 1 << 20
_SCAN_CHUNK = 50_000  # ids per fetch while a filter is built from the file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    tenant_id   TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    ingested_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
) WITHOUT ROWID;
DROP INDEX IF EXISTS seen_ingested;
CREATE TABLE IF NOT EXISTS recent (
    tenant_id   TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    ingested_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
"""
_TABLES = ("recent", "seen")
# One batch of held ids as ONE statement (``_json_batch``): a JSON array of runs
# [ingested_ms, [[tenant_id, event_id], ...]], inserted in key order (sorted by sqlite, without
# the interpreter lock). The runs are read once: sqlite does not flatten a subquery with a
# LIMIT into a join (its query flattener's rules; `EXPLAIN QUERY PLAN` says MATERIALIZE r),
# where each id's ms would be taken from its run's text, parsed again per id (4x the time).
_INSERT_JSON = (
    "INSERT OR IGNORE INTO recent (tenant_id, event_id, ingested_ms) "
    "SELECT json_extract(k.value, '$[0]'), json_extract(k.value, '$[1]'), r.ms "
    "FROM (SELECT json_extract(value, '$[0]') AS ms, json_extract(value, '$[1]') AS ids "
    "FROM json_each(?) LIMIT -1) AS r, json_each(r.ids) AS k ORDER BY 1, 2"
)
_INSERT_ROWS = "INSERT OR IGNORE INTO recent (tenant_id, event_id, ingested_ms) VALUES (?,?,?)"
_SET_WATERMARK = (
    "INSERT INTO meta (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)
_LOOKUP = " UNION ALL ".join(
    f"SELECT event_id FROM {t} WHERE tenant_id = ? AND event_id IN (SELECT value FROM json_each(?))"
    for t in _TABLES
)


def index_path(directory: Path, partition: int) -> Path:
    return directory / f"partition-{partition}.sqlite"


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
    # a new file only (an existing one keeps the page size it was created with)
    db.execute(f"PRAGMA page_size={PAGE_SIZE}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=60000")
    db.execute("PRAGMA cache_size=-16000")  # 16 MB page cache: bounded memory
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


def _json_batch(held: dict[Key, int]) -> bytes:
    """The held ids (key -> ingested_ms) as the JSON parameter of ``_INSERT_JSON``: one
    ``[ingested_ms, [[tenant_id, event_id], ...]]`` per run of consecutive ids with the same
    ingested_ms (an envelope's ids are recorded one after another). No object is built per id:
    the keys are dumped as they are held, the runs found with numpy (3.4x less time on the
    flush thread than a ``[tenant_id, event_id, ingested_ms]`` tuple per id)."""
    keys = list(held)
    if not keys:
        return b"[]"
    ms = list(held.values())
    col = np.array(ms, dtype=np.int64)
    cuts = (np.flatnonzero(col[1:] != col[:-1]) + 1).tolist()
    starts, ends = [0, *cuts], [*cuts, len(keys)]
    return orjson.dumps([[ms[a], keys[a:b]] for a, b in zip(starts, ends, strict=True)])


def _write_batch(
    db: sqlite3.Connection,
    rows: bytes | Iterable[tuple[object, ...]],
    watermark: int,
    topic: str,
) -> int:
    """One transaction: ids into ``recent`` (``rows``: (tenant, id, ingested_ms) tuples in key
    order, or ``_json_batch`` of them, one statement that sqlite sorts) and the watermark of
    ``topic``. Returns the ids added."""
    with _immediate(db):
        before = db.total_changes
        if isinstance(rows, bytes):
            db.execute(_INSERT_JSON, (rows.decode(),))
        else:
            db.executemany(_INSERT_ROWS, rows)
        added = db.total_changes - before
        db.execute(_SET_WATERMARK, (_wm(topic), watermark))
    return added


class _Job(NamedTuple):
    """The background thread's work in flight: a write of held ids (``ids``: what it writes,
    still seen by ``contains_many``; ``watermark``: theirs), then the move of ``recent`` if
    that write fills it."""

    future: Future[tuple[int, int, BaseException | None]]
    ids: dict[Key, int]
    watermark: int


class DedupeIndex:
    """Seen ids of one partition. Thread-safe: one connection behind a lock, plus the background
    thread's own connection, the only writer while its job runs (every write of the other one
    first waits for that job)."""

    def __init__(
        self,
        path: Path,
        topic: str,
        pending_max: int = PENDING_MAX,
        recent_max: int = RECENT_MAX,
        filter_max_bytes: int = FILTER_MAX_BYTES,
    ) -> None:
        self.path = path
        self.topic = topic  # the topic whose watermark ``watermark``/``add_many`` use
        self.pending_max = pending_max
        self.recent_max = recent_max
        # recorded ids not handed to the background thread yet (key -> ingested_ms) and the
        # watermark they move to
        self._pending: dict[Key, int] = {}
        self._pending_wm: int | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = _connect(path)
        self._db.executescript(_SCHEMA)
        # the background write (and move) in flight, its thread and that thread's connection
        self._job: _Job | None = None
        self._behind: ThreadPoolExecutor | None = None
        self._bdb: sqlite3.Connection | None = None
        # ids in ``recent``, and in both tables (kept in step by every write: read by the
        # worker's metrics, never scanned; an id in both tables, which no write makes, would
        # count twice)
        self.recent = self._count("recent")
        self.entries = self.recent + self._count("seen")
        # The id filter (``streams.idfilter``): None until it is built from the file, which
        # the first lookup starts (lookups ask the file about every id meanwhile).
        # ``_filter_gen`` is bumped by every new build (a build of an older one is dropped);
        # ``_backlog`` collects the ids recorded while one runs (None: no build in flight).
        self.filter_max_bytes = filter_max_bytes
        self._filter: IdFilter | None = None
        self._filter_gen = 0
        self._backlog: list[Key] | None = None
        self._builder: threading.Thread | None = None
        self._build_ok = True  # False after a failed build: none until the next refresh

    def _count(self, table: str) -> int:
        return int(self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    @classmethod
    def open(
        cls,
        directory: Path,
        topic: str,
        partition: int,
        filter_max_bytes: int = FILTER_MAX_BYTES,
    ) -> DedupeIndex:
        return cls(index_path(directory, partition), topic, filter_max_bytes=filter_max_bytes)

    def close(self) -> None:
        with self._lock:
            self._filter_gen += 1  # a build in flight stops at its next chunk
            builder = self._builder
        if builder is not None:
            builder.join()
        with self._lock:
            try:
                self._write_pending()
            finally:
                if self._behind is not None:
                    self._behind.shutdown(wait=True)
                    self._behind = None
                if self._bdb is not None:
                    self._bdb.close()
                    self._bdb = None
                self._db.close()

    def wait_behind(self) -> None:
        """Wait for the background write or move in flight, if any (its error is raised; the
        ids of a failed write are held again)."""
        with self._lock:
            self._settle()

    def flush(self) -> None:
        """Write the recorded ids still held in memory (with their watermark)."""
        with self._lock:
            self._write_pending()

    @property
    def pending(self) -> int:
        """Recorded ids not known to be in the file yet (held, or being written)."""
        job = self._job
        return len(self._pending) + (len(job.ids) if job is not None else 0)

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
        with self._lock:
            self._write_pending()
            return int(
                self._db.execute(
                    "SELECT count(*) FROM (SELECT tenant_id, event_id FROM seen "
                    "UNION SELECT tenant_id, event_id FROM recent)"
                ).fetchone()[0]
            )

    def contains_many(self, keys: Iterable[Key]) -> set[Key]:
        """The subset of ``keys`` present in the index.

        Queried per tenant as ``tenant_id = ? AND event_id IN (...)``, which sqlite answers with
        primary-key searches; a row-value ``(tenant_id, event_id) IN (VALUES ...)`` would scan the
        whole table for every chunk and get slower as the index grows.
        """
        found: set[Key] = set()
        with self._lock:
            # ids the filter has certainly never got are not in the index: no query for them
            flt = self._filter
            if flt is not None:
                keys = flt.maybe(keys if isinstance(keys, Collection) else list(keys))
            else:
                self._start_filter()
            # ids held for the batched write, or being written: no query for them. (The job's
            # ids are dropped from memory only under this lock, once its transaction is over.)
            job = self._job
            for held in (self._pending, job.ids if job is not None else None):
                if held:
                    keys = list(keys)
                    hits = list(filter(held.__contains__, keys))
                    if hits:
                        found.update(hits)
                        keys = list(filterfalse(held.__contains__, keys))
            by_tenant: dict[str, list[str]] = {}
            for tenant_id, event_id in keys:
                ids = by_tenant.get(tenant_id)
                if ids is None:
                    by_tenant[tenant_id] = [event_id]
                else:
                    ids.append(event_id)
            # one query per tenant for both tables, the ids as ONE JSON array parameter
            # (``json_each``): binding thousands of parameters one by one costs more than the
            # B-tree searches themselves. sqlite's JSON functions cut a string at a NUL
            # character, so ids with one are bound one by one.
            db = self._db
            for tenant_id, ids in by_tenant.items():
                param = orjson.dumps(ids).decode()
                if "\\u0000" not in param:
                    rows = db.execute(_LOOKUP, (tenant_id, param) * 2)
                    found.update((tenant_id, e) for (e,) in rows)
                    continue
                for i in range(0, len(ids), _CHUNK):
                    chunk = ids[i : i + _CHUNK]
                    marks = ",".join("?" * len(chunk))
                    for table in _TABLES:
                        sql = (
                            f"SELECT event_id FROM {table} WHERE tenant_id = ? "
                            f"AND event_id IN ({marks})"
                        )
                        found.update(
                            (tenant_id, e) for (e,) in db.execute(sql, [tenant_id, *chunk])
                        )
        return found

    def add_many(
        self,
        keys_with_ms: Iterable[tuple[str, str, int]],
        watermark: int,
        topic: str | None = None,
    ) -> None:
        """Record ids (tenant_id, event_id, ingested_ms) and move the watermark of ``topic``
        (default: the current topic), atomically. An id already present keeps its first
        ingested_ms. The keys are inserted in key order: the primary-key B-tree is then written
        page after page instead of at random places (1.7x faster on a large index).
        """
        rows = sorted(keys_with_ms)
        with self._lock:
            self._write_pending()
            self._write(rows, watermark, topic or self.topic)
            if self._filter is not None or self._backlog is not None:  # else nobody wants them
                self._note([(t, e) for t, e, _ms in rows])

    def record_keys(self, keys: Sequence[Key], ingested_ms: Sequence[int], watermark: int) -> None:
        """``add_many`` for the current topic, batched: the ids ``keys[i]`` ingested at
        ``ingested_ms[i]`` (parallel columns, as the worker has them: no tuple is built per id
        here) are held in memory (seen by ``contains_many``) and, once ``pending_max`` ids are
        held, written with ``watermark`` by the background thread; the index is read or
        changed otherwise (``flush``, ``close``, ``watermark``...) only after they are written.
        An id already held or present keeps its first ingested_ms. The error of a failed write
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
        nothing in flight): one write, then the move of ``recent`` if the write fills it."""
        pending = self._pending
        param = _json_batch(pending)
        if b"\\u0000" in param:  # sqlite's JSON cuts a string at NUL: bind those one by one
            self._write_pending()
            return
        if self._behind is None:
            self._behind = ThreadPoolExecutor(1, thread_name_prefix="tally-dedupe-write")
        future = self._behind.submit(self._write_and_move, param, wm, self.topic, self.recent)
        self._job = _Job(future, pending, wm)
        self._pending = {}
        self._pending_wm = None

    def _background_db(self) -> sqlite3.Connection:
        if self._bdb is None:
            self._bdb = _connect(self.path)
        return self._bdb

    def _write_and_move(
        self, param: bytes, watermark: int, topic: str, recent: int
    ) -> tuple[int, int, BaseException | None]:
        """(background thread) Write one batch (raises if that fails), then move ``recent``
        into ``seen`` if it is full. Returns (ids added, ids moved, the move's error)."""
        added = self._write_json(param, watermark, topic)
        if recent + added < self.recent_max:
            return added, 0, None
        try:
            return added, self._move_recent(), None
        except Exception as exc:  # the batch is written all the same
            return added, 0, exc

    def _write_json(self, param: bytes, watermark: int, topic: str) -> int:
        """(background thread) One transaction: the batch (a JSON array) into ``recent`` and
        the watermark of ``topic``. Returns the ids added."""
        return _write_batch(self._background_db(), param, watermark, topic)

    def _move_recent(self) -> int:
        """(background thread) One transaction: ``recent``'s ids into ``seen`` (an id already
        there keeps its first ingested_ms), ``recent`` emptied. Returns the ids ``recent``
        held."""
        db = self._background_db()
        with _immediate(db):
            db.execute(
                "INSERT OR IGNORE INTO seen (tenant_id, event_id, ingested_ms) "
                "SELECT tenant_id, event_id, ingested_ms FROM recent"
            )
            moved = db.execute("DELETE FROM recent").rowcount
        return int(moved)

    def _settle(self) -> None:
        """Wait for the background job in flight (lock held) and account for it. A failed write
        puts its ids back among the held ones (before them: theirs are the first
        ingested_ms); its error, or a failed move's, is logged and raised (``recent`` is
        unchanged by a failed move; the next full write moves it)."""
        job = self._job
        if job is None:
            return
        self._job = None
        try:
            added, moved, move_error = job.future.result()
        except Exception as exc:
            held = job.ids
            deque(map(held.setdefault, self._pending, self._pending.values()), maxlen=0)
            self._pending = held
            if self._pending_wm is None:
                self._pending_wm = job.watermark
            log.warning("dedupe index %s: writing recorded ids failed: %r", self.path, exc)
            raise
        self.entries += added
        self.recent = max(0, self.recent + added - moved)
        if move_error is not None:
            log.warning("dedupe index %s: moving recent ids failed: %r", self.path, move_error)
            raise move_error

    def _write_pending(self) -> None:
        """Write the held ids and their watermark on this thread, after the job in flight (lock
        held). On failure they stay held."""
        self._settle()
        if self._pending_wm is None:
            return
        pending = self._pending
        keys = sorted(pending)
        # (tenant, id) + (ingested_ms,) per key, in key order, built in C
        rows = list(map(tuple.__add__, keys, zip(map(pending.__getitem__, keys))))
        self._write(rows, self._pending_wm, self.topic)
        self._pending = {}
        self._pending_wm = None

    def _write(self, rows: Iterable[tuple[object, ...]], watermark: int, topic: str) -> None:
        """Insert ``rows`` (in key order) into ``recent`` and set the watermark of ``topic``,
        atomically (lock held, no job in flight)."""
        added = _write_batch(self._db, rows, watermark, topic)
        self.entries += added
        self.recent += added

    def purge_older_than(self, ms: int) -> int:
        """Forget ids ingested before ``ms`` (the horizon). Returns how many were removed.

        A scan of the table (the worker calls it once an hour): an index on ``ingested_ms``
        would make every ``add_many`` write a second B-tree, which halved its rate.
        """
        with self._lock:
            self._write_pending()
            removed = 0
            for table in _TABLES:
                cur = self._db.execute(f"DELETE FROM {table} WHERE ingested_ms < ?", (ms,))
                removed += cur.rowcount
                if table == "recent":
                    self.recent = max(0, self.recent - cur.rowcount)
            self.entries = max(0, self.entries - removed)
            return removed

    def reset(self) -> None:
        """Forget everything (watermark back to -1), the held ids too."""
        with self._lock:
            with contextlib.suppress(Exception):  # logged; forgotten anyway
                self._settle()
            self._pending = {}
            self._pending_wm = None
            with _immediate(self._db):
                for table in (*_TABLES, "meta"):
                    self._db.execute(f"DELETE FROM {table}")
            self.entries = 0
            self.recent = 0
            if self.filter_max_bytes > 0:  # the file is empty: so is its filter
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
        """Drop the filter: the next lookup builds it again from the file (in the background;
        meanwhile lookups ask the file). For when the file may hold ids this object did not
        record: another process wrote it while the partition was elsewhere. ``rebuild`` calls
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
        """Start building a filter of every id of the file and of those held (lock held)."""
        self._filter_gen += 1
        self._filter = None
        job = self._job
        # held ids (in the file or not by the time the scan reads it) and, from now on, every
        # recorded id: with the file's ids at the scan's snapshot, nothing is left out
        self._backlog = [*self._pending, *(job.ids if job is not None else ())]
        self._builder = threading.Thread(
            target=self._build,
            args=(self._filter_gen, self._first_words(self.entries + len(self._backlog))),
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

    def _build(self, gen: int, words: int) -> None:
        """(builder thread) Scan the file in one read snapshot into a new filter; install it
        with the backlog unless a newer build or a close came meanwhile."""
        started = time.perf_counter()
        flt = IdFilter(words, self.filter_max_bytes)
        try:
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA busy_timeout=60000")
                db.execute("BEGIN")  # one snapshot of both tables, from the first read
                for table in _TABLES:
                    cur = db.execute(f"SELECT tenant_id, event_id FROM {table}")
                    while rows := cur.fetchmany(_SCAN_CHUNK):
                        if self._filter_gen != gen:
                            return
                        flt.add(rows)
                db.execute("COMMIT")
            finally:
                db.close()
        except Exception as exc:
            with self._lock:
                if self._filter_gen == gen:  # no backlog left growing
                    self._backlog = None
                    self._build_ok = False
            log.warning(
                "dedupe index %s: building its id filter failed (lookups ask the file): %r",
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
