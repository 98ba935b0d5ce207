"""The store side of backfill runs (tables of migration 031; protocol: ``streams.backfill.Store``).

SQL builders are pure functions returning ``(sql, params)``; ``BackfillStore`` runs them.

- ``scan_sql``: the tenant's events of an event type on the backfill side of a ``Boundary``, in
  event id order after a keyset position (``events FINAL``).
- ``write_chunk``: ONE insert into ``usage_backfill`` (one part: atomic) of a chunk's usage rows
  plus its checkpoint row, with ``insert_deduplication_token`` = (tenant, meter, run, chunk); the
  table keeps the last 10000 tokens (``non_replicated_deduplication_window``), so a chunk re-sent
  by a resumed run, or after an answer that was lost, is stored once.
- checkpoint rows: ``meter_id = '~cp:<meter id>'``, ``origin = 'b:<run>'``, ``group_key`` = the
  zero-padded chunk number, ``group_values`` = the keyset position and the chunk's counters. Usage
  queries filter on the real meter id, so they never see them.
- locks: ``backfill_locks`` rows inserted with the token (tenant, meter, seq). The store keeps one
  row per seq (the others are dropped as duplicates); should two ever survive (a contender whose
  insert came after 1000 other lock inserts), the row with the smallest (acquired_at, owner) is
  the holder, for every reader alike.
- ``BACKFILL_ORIGIN_SQL``: the scalar subquery usage queries use to read only the meter's latest
  complete run (``clickhouse.queries.usage_sql``); ``BACKFILL_SEQ_SQL``: the corrections that run
  applied itself (its ``corrections_seq``), so that queries add only the later ones.
- event corrections: the scan applies the corrections with ``1 <= seq <= corrections_seq`` of the
  run (a voided event is scanned but not counted; an amended one is counted with its corrected
  properties); later corrections reach the run through their effect rows (side 'b').
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

from clickhouse.sink import EPOCH, NO_LATEST, ONE_PART_SETTINGS, USAGE_COLUMNS, ClickHouseSink
from clickhouse.store import Store, check_identifier
from schemas.backfill import (
    ALL_OFFSETS,
    COMPLETE,
    Boundary,
    Checkpoint,
    LockRow,
    RunRecord,
    origin_of,
)
from schemas.timeutil import from_epoch_ms

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "~cp:"
_DELETE_SETTINGS: dict[str, Any] = {"mutations_sync": 2}

# The origin ('b:<run id>') of the meter's latest complete run, or 'b:' when it has none. Uses
# the {tenant:String} and {meter:String} parameters of the query it is part of.
BACKFILL_ORIGIN_SQL = (
    "(SELECT concat('b:', argMax(run_id, (finished_at, run_id))) FROM {db}.backfill_runs "
    "WHERE tenant_id = {{tenant:String}} AND meter_id = {{meter:String}} AND state = 'complete')"
)

# The corrections (seq) the meter's latest complete run applied in its own scan (0 without one).
BACKFILL_SEQ_SQL = (
    "(SELECT argMax(corrections_seq, (finished_at, run_id)) FROM {db}.backfill_runs "
    "WHERE tenant_id = {{tenant:String}} AND meter_id = {{meter:String}} AND state = 'complete')"
)

RUN_COLUMNS = [
    "tenant_id",
    "meter_id",
    "run_id",
    "state",
    "owner",
    "boundary",
    "chunk_events",
    "events_total",
    "events_scanned",
    "events_matched",
    "value_problems",
    "windows",
    "chunks",
    "error",
    "started_at",
    "heartbeat_at",
    "finished_at",
    "version",
    "corrections_seq",
]
LOCK_COLUMNS = ["tenant_id", "meter_id", "seq", "run_id", "owner", "acquired_at"]
_RUN_SELECT = (
    "tenant_id, meter_id, run_id, state, owner, boundary, chunk_events, events_total, "
    "events_scanned, events_matched, value_problems, windows, chunks, error, "
    "toUnixTimestamp64Milli(started_at), toUnixTimestamp64Milli(heartbeat_at), "
    "toUnixTimestamp64Milli(finished_at), version, corrections_seq"
)
_LOCK_SELECT = "tenant_id, meter_id, seq, run_id, owner, toUnixTimestamp64Milli(acquired_at)"


def checkpoint_meter(meter_id: str) -> str:
    return CHECKPOINT_PREFIX + meter_id


# --- SQL builders (pure) -----------------------------------------------------------------------


def boundary_sql(boundary: Boundary) -> tuple[str, dict[str, Any]]:
    """The WHERE fragment of ``Boundary.includes`` over ``events`` columns."""
    parts = sorted(boundary.bounds)
    params: dict[str, Any] = {
        "bf_older": list(boundary.older),
        "bf_topic": boundary.topic,
        "bf_parts": parts,
        "bf_offsets": [boundary.bounds[p] for p in parts],
        "bf_all": ALL_OFFSETS,
    }
    sql = (
        "(source_topic IN {bf_older:Array(String)} OR (source_topic = {bf_topic:String} "
        "AND source_offset < transform(source_partition, {bf_parts:Array(Int32)}, "
        "{bf_offsets:Array(Int64)}, {bf_all:Int64})))"
    )
    return sql, params


def scan_sql(
    database: str,
    tenant_id: str,
    event_type: str,
    boundary: Boundary,
    after: str,
    limit: int,
    corrections_seq: int = 0,
) -> tuple[str, dict[str, Any]]:
    """Up to ``limit`` events after the keyset position ``after`` (event id; '' = start), with
    the corrections ``1 <= seq <= corrections_seq`` applied: ``(event_id, customer, time_ms,
    properties_json, action)`` where ``action`` is the event's latest applied correction
    ('void': not counted; 'amend': ``properties_json`` are the amended properties; '': none)."""
    db = check_identifier(database)
    cond, params = boundary_sql(boundary)
    params.update(
        tenant=tenant_id, type=event_type, after=after, limit=int(limit), cs=int(corrections_seq)
    )
    sql = (
        "SELECT e.event_id, e.customer, e.t, if(c.action = 'amend', c.props, e.properties), "
        "c.action FROM (SELECT event_id, customer, toUnixTimestamp64Milli(time) AS t, properties "
        f"FROM {db}.events FINAL "
        "WHERE tenant_id = {tenant:String} AND event_id > {after:String} "
        f"AND event_type = {{type:String}} AND {cond} "
        "ORDER BY event_id LIMIT 1 BY event_id LIMIT {limit:UInt64}) AS e "
        "LEFT JOIN (SELECT event_id, argMax(action, seq) AS action, argMax(properties, seq) AS props "
        f"FROM {db}.corrections FINAL WHERE tenant_id = {{tenant:String}} AND meter_id = '' "
        "AND seq >= 1 AND seq <= {cs:UInt64} AND event_id > {after:String} GROUP BY event_id) AS c "
        "ON e.event_id = c.event_id ORDER BY e.event_id"
    )
    return sql, params


def count_sql(
    database: str, tenant_id: str, event_type: str, boundary: Boundary
) -> tuple[str, dict[str, Any]]:
    db = check_identifier(database)
    cond, params = boundary_sql(boundary)
    params.update(tenant=tenant_id, type=event_type)
    sql = (
        f"SELECT uniqExact(event_id) FROM {db}.events FINAL "
        f"WHERE tenant_id = {{tenant:String}} AND event_type = {{type:String}} AND {cond}"
    )
    return sql, params


def backfill_origin_sql(database: str) -> str:
    return BACKFILL_ORIGIN_SQL.format(db=check_identifier(database))


def backfill_seq_sql(database: str) -> str:
    return BACKFILL_SEQ_SQL.format(db=check_identifier(database))


def checkpoint_row(tenant_id: str, meter_id: str, run_id: str, cp: Checkpoint) -> tuple:
    values = {
        "chunk": str(cp.chunk),
        "last": cp.last_event_id,
        "scanned": str(cp.scanned),
        "matched": str(cp.matched),
        "problems": str(cp.problems),
    }
    return (
        tenant_id,
        checkpoint_meter(meter_id),
        "",
        EPOCH,
        f"{cp.chunk:012d}",
        origin_of(run_id),
        values,
        0,
        0,
        Decimal(0),
        None,
        None,
        [],
        NO_LATEST,
        cp.chunk,
    )


def chunk_token(tenant_id: str, meter_id: str, run_id: str, chunk: int) -> str:
    return f"backfill/{tenant_id}/{meter_id}/{run_id}/{chunk}"


def lock_token(tenant_id: str, meter_id: str, seq: int) -> str:
    return f"backfill-lock/{tenant_id}/{meter_id}/{seq}"


def _dt(ms: int) -> datetime:
    return from_epoch_ms(ms) if ms > 0 else datetime(1970, 1, 1, tzinfo=UTC)


def _run(row: tuple, complete: bool = False) -> RunRecord:
    (t, m, r, state, owner, boundary, chunk_events, total, scanned, matched, problems) = row[:11]
    windows, chunks, error, started, beat, finished, version, corrections_seq = row[11:]
    return RunRecord(
        tenant_id=t,
        meter_id=m,
        run_id=r,
        state=COMPLETE if complete else state,
        owner=owner,
        boundary=Boundary.from_json(boundary) if boundary else None,
        chunk_events=int(chunk_events),
        events_total=int(total),
        events_scanned=int(scanned),
        events_matched=int(matched),
        value_problems=int(problems),
        windows=int(windows),
        chunks=int(chunks),
        error=error,
        started_ms=int(started),
        heartbeat_ms=int(beat),
        finished_ms=int(finished),
        version=int(version),
        corrections_seq=int(corrections_seq),
    )


def _lock(row: tuple) -> LockRow:
    t, m, seq, run_id, owner, acquired = row
    return LockRow(t, m, int(seq), run_id, owner, int(acquired))


class BackfillStore:
    """Implements ``streams.backfill.Store`` on ClickHouse."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.database
        self._sink = ClickHouseSink(store)

    # --- the boundary ---------------------------------------------------------------------------
    def ledger_topics(self, tenant_id: str, event_type: str) -> list[str]:
        rows = self.store.query_rows(
            f"SELECT DISTINCT source_topic FROM {self.db}.events "
            "WHERE tenant_id = {tenant:String} AND event_type = {type:String}",
            {"tenant": tenant_id, "type": event_type},
        )
        return sorted(str(r[0]) for r in rows)

    def activation_offsets(self, tenant_id: str, meter_id: str, topic: str) -> dict[int, int]:
        rows = self.store.query_rows(
            f"SELECT source_partition, min(marker_offset) FROM {self.db}.meter_activations "
            "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} "
            "AND topic = {topic:String} GROUP BY source_partition",
            {"tenant": tenant_id, "meter": meter_id, "topic": topic},
        )
        return {int(p): int(o) for p, o in rows}

    def progress(self, topic: str) -> dict[int, int]:
        return self._sink.progress(topic)

    # --- the scan -------------------------------------------------------------------------------
    def count_events(self, tenant_id: str, event_type: str, boundary: Boundary) -> int:
        sql, params = count_sql(self.db, tenant_id, event_type, boundary)
        rows = self.store.query_rows(sql, params)
        return int(rows[0][0]) if rows else 0

    def scan_events(
        self,
        tenant_id: str,
        event_type: str,
        boundary: Boundary,
        after: str,
        limit: int,
        corrections_seq: int = 0,
    ) -> list[tuple[str, str, int, dict[str, Any] | None]]:
        """``(event_id, customer, time_ms, properties)``; properties None = voided."""
        sql, params = scan_sql(
            self.db, tenant_id, event_type, boundary, after, limit, corrections_seq
        )
        return [
            (str(e), str(c), int(t), None if a == "void" else orjson.loads(p))
            for e, c, t, p, a in self.store.query_rows(sql, params)
        ]

    def corrections_top(self, tenant_id: str) -> int:
        """The newest correction seq of the tenant (0 without any)."""
        rows = self.store.query_rows(
            f"SELECT max(seq) FROM {self.db}.corrections WHERE tenant_id = {{tenant:String}} "
            "AND meter_id = ''",
            {"tenant": tenant_id},
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    # --- chunks ---------------------------------------------------------------------------------
    def write_chunk(
        self, tenant_id: str, meter_id: str, run_id: str, rows: list[tuple], cp: Checkpoint
    ) -> None:
        origin = origin_of(run_id)
        for r in rows:
            if r[0] != tenant_id or r[1] != meter_id or r[5] != origin:
                raise ValueError(f"backfill row {r[:6]!r} is not of run {origin} of {meter_id}")
        settings = dict(ONE_PART_SETTINGS)
        settings["insert_deduplication_token"] = chunk_token(tenant_id, meter_id, run_id, cp.chunk)
        self.store.insert(
            "usage_backfill",
            [*rows, checkpoint_row(tenant_id, meter_id, run_id, cp)],
            USAGE_COLUMNS,
            settings=settings,
        )

    def checkpoints(self, tenant_id: str, meter_id: str, run_id: str) -> list[Checkpoint]:
        rows = self.store.query_rows(
            f"SELECT group_key, any(group_values) FROM {self.db}.usage_backfill "
            "WHERE tenant_id = {tenant:String} AND meter_id = {cp:String} "
            "AND origin = {origin:String} GROUP BY group_key ORDER BY group_key",
            {"tenant": tenant_id, "cp": checkpoint_meter(meter_id), "origin": origin_of(run_id)},
        )
        out = []
        for _key, v in rows:
            out.append(
                Checkpoint(
                    int(v["chunk"]),
                    v["last"],
                    int(v["scanned"]),
                    int(v["matched"]),
                    int(v["problems"]),
                )
            )
        return out

    def count_windows(self, tenant_id: str, meter_id: str, run_id: str) -> int:
        rows = self.store.query_rows(
            f"SELECT count() FROM (SELECT 1 FROM {self.db}.usage_backfill "
            "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} "
            "AND origin = {origin:String} GROUP BY customer, window_start, group_key)",
            {"tenant": tenant_id, "meter": meter_id, "origin": origin_of(run_id)},
        )
        return int(rows[0][0]) if rows else 0

    # --- the lock -------------------------------------------------------------------------------
    def lock_head(self, tenant_id: str, meter_id: str) -> LockRow | None:
        rows = self.store.query_rows(
            f"SELECT {_LOCK_SELECT} FROM {self.db}.backfill_locks "
            "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} "
            "ORDER BY seq DESC, acquired_at, owner LIMIT 1",
            {"tenant": tenant_id, "meter": meter_id},
        )
        return _lock(rows[0]) if rows else None

    def insert_lock(self, row: LockRow) -> None:
        self.store.insert(
            "backfill_locks",
            [
                (
                    row.tenant_id,
                    row.meter_id,
                    row.seq,
                    row.run_id,
                    row.owner,
                    _dt(row.acquired_ms),
                )
            ],
            LOCK_COLUMNS,
            settings={
                "insert_deduplication_token": lock_token(row.tenant_id, row.meter_id, row.seq)
            },
        )

    def lock_at(self, tenant_id: str, meter_id: str, seq: int) -> LockRow | None:
        rows = self.store.query_rows(
            f"SELECT {_LOCK_SELECT} FROM {self.db}.backfill_locks "
            "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} "
            "AND seq = {seq:UInt64} ORDER BY acquired_at, owner LIMIT 1",
            {"tenant": tenant_id, "meter": meter_id, "seq": int(seq)},
        )
        return _lock(rows[0]) if rows else None

    # --- runs -----------------------------------------------------------------------------------
    def save_run(self, record: RunRecord) -> None:
        r = record
        self.store.insert(
            "backfill_runs",
            [
                (
                    r.tenant_id,
                    r.meter_id,
                    r.run_id,
                    r.state,
                    r.owner,
                    r.boundary.to_json() if r.boundary is not None else "",
                    r.chunk_events,
                    r.events_total,
                    r.events_scanned,
                    r.events_matched,
                    r.value_problems,
                    r.windows,
                    r.chunks,
                    r.error,
                    _dt(r.started_ms),
                    _dt(r.heartbeat_ms),
                    _dt(r.finished_ms),
                    r.version,
                    r.corrections_seq,
                )
            ],
            RUN_COLUMNS,
        )

    def _complete_ids(self, tenant_id: str, meter_id: str) -> set[str]:
        rows = self.store.query_rows(
            f"SELECT DISTINCT run_id FROM {self.db}.backfill_runs "
            "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} "
            "AND state = 'complete'",
            {"tenant": tenant_id, "meter": meter_id},
        )
        return {str(r[0]) for r in rows}

    def get_run(self, tenant_id: str, meter_id: str, run_id: str) -> RunRecord | None:
        """The newest version of the run; ``complete`` as soon as any version says so (a late
        heartbeat of a finished run cannot make it look unfinished)."""
        rows = self.store.query_rows(
            f"SELECT {_RUN_SELECT} FROM {self.db}.backfill_runs "
            "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} "
            "AND run_id = {run:String} ORDER BY version DESC LIMIT 1",
            {"tenant": tenant_id, "meter": meter_id, "run": run_id},
        )
        if not rows:
            return None
        return _run(rows[0], run_id in self._complete_ids(tenant_id, meter_id))

    def list_runs(self, tenant_id: str, meter_id: str) -> list[RunRecord]:
        """Every run of the meter (newest version of each), oldest first."""
        rows = self.store.query_rows(
            f"SELECT {_RUN_SELECT} FROM {self.db}.backfill_runs "
            "WHERE tenant_id = {tenant:String} AND meter_id = {meter:String} "
            "ORDER BY run_id, version DESC LIMIT 1 BY run_id",
            {"tenant": tenant_id, "meter": meter_id},
        )
        done = self._complete_ids(tenant_id, meter_id)
        runs = [_run(r, str(r[2]) in done) for r in rows]
        return sorted(runs, key=lambda r: (r.started_ms, r.run_id))

    def visible_run(self, tenant_id: str, meter_id: str) -> str | None:
        """The run id usage queries read (the latest complete run), or None."""
        rows = self.store.query_rows(
            "SELECT " + backfill_origin_sql(self.db),
            {"tenant": tenant_id, "meter": meter_id},
        )
        origin = str(rows[0][0]) if rows else "b:"
        return origin[2:] or None

    # --- garbage collection -----------------------------------------------------------------------
    def retire_runs(self, tenant_id: str, meter_id: str, keep_run_id: str) -> None:
        """Delete the rows of every run of the meter but ``keep_run_id`` (which must be its
        latest complete run, so no query reads the deleted rows)."""
        keep = origin_of(keep_run_id)
        params = {
            "tenant": tenant_id,
            "meter": meter_id,
            "cp": checkpoint_meter(meter_id),
            "keep": keep,
        }
        stale = self.store.query_rows(
            f"SELECT count() FROM {self.db}.usage_backfill WHERE tenant_id = {{tenant:String}} "
            "AND meter_id IN ({meter:String}, {cp:String}) AND origin != {keep:String}",
            params,
        )
        if stale and int(stale[0][0]):
            self.store.command(
                f"DELETE FROM {self.db}.usage_backfill WHERE tenant_id = {{tenant:String}} "
                "AND meter_id IN ({meter:String}, {cp:String}) AND origin != {keep:String}",
                params,
                settings=_DELETE_SETTINGS,
            )
        # rows of runs made by versions before usage_backfill existed
        legacy = self.store.query_rows(
            f"SELECT count() FROM {self.db}.usage_minute WHERE tenant_id = {{tenant:String}} "
            "AND meter_id = {meter:String} AND startsWith(origin, 'b:')",
            params,
        )
        if legacy and int(legacy[0][0]):
            self.store.command(
                f"DELETE FROM {self.db}.usage_minute WHERE tenant_id = {{tenant:String}} "
                "AND meter_id = {meter:String} AND startsWith(origin, 'b:')",
                params,
                settings=_DELETE_SETTINGS,
            )
