"""The worker's sink: flush commit, progress, dedupe-index rebuild (``streams.sink.Sink``).

The worker's batches are Arrow tables (``schemas.columns``: ``EVENTS_SCHEMA``, ``USAGE_SCHEMA``),
inserted with ``insert_arrow``: chDB and ClickHouse read the columns as they are, no per-value
Python encoding. ``commit`` (tests, tools) takes the same columns as Python row tuples
(``schemas.columns.EventRow`` / ``UsageRow`` order; times as aware UTC datetimes; ``latest`` =
``(time_ms, event_id, value)`` or ``(0, '', Decimal(0))``).

Commit of one link (docs/architecture.md, "The worker's commit protocol"): 1) ``insert_events``:
INSERT the kept events into ``events`` (idempotent: a replay writes the same rows, which
``ReplacingMergeTree`` collapses, and readers that count use ``FINAL``;
``EVENTS_INSERT_SETTINGS``); 2) ``commit_link``: ONE INSERT into ``usage_minute`` of the
link's usage rows, their day rows (``clickhouse.rollup``) and its partition's progress row
(``tenant_id=''``, ``meter_id='~progress'``, ``customer=<topic>``, ``group_key=<partition>``,
``source_offset=<last offset>``), with
``insert_deduplication_token = chain_token(topic, partition, first)``. ``usage_minute`` has no
``PARTITION BY`` and the insert settings squash all blocks into one, so the insert is one part
and one block: atomic, and deduplicated as a whole (``non_replicated_deduplication_window``,
migration 020). That insert is the commit point of the link. ``read_chain`` reads progress and
partition claims (fencing) in one query, and is how the worker learns whose link landed: the
insert's answer does not say whether it was deduplicated.

Every other insert into ``usage_minute`` (backfill, tools) goes through ``unique_insert_settings``:
a fresh token, so that the table's deduplication never drops rows that merely look like earlier
ones (without a token, ClickHouse would deduplicate identical blocks by their hash).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa

from clickhouse.activation import ActivationRows
from clickhouse.deadletters import DeadLetterRows
from clickhouse.repo import Repo
from clickhouse.rollup import with_day_rows
from clickhouse.store import Store
from schemas.columns import EVENTS_COLUMNS, USAGE_COLUMNS, USAGE_SCHEMA, usage_table
from schemas.meters import Meter
from schemas.timeutil import from_epoch_ms
from schemas.worker import ChainState, Claim, WorkerStatus, chain_token
from tally.errors import ValidationError

log = logging.getLogger(__name__)

PROGRESS_METER = "~progress"
# The highest block number of the part a row is in: a MergeTree part is named
# ``<partition id>_<min block>_<max block>_<level>[_<mutation>]`` (``usage_minute`` has no
# PARTITION BY: the partition id is ``all``). A condition on it alone lets the store drop parts
# before it reads them (``read_chain``).
PART_MAX_BLOCK = "toUInt64(splitByChar('_', _part)[3])"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NO_LATEST = (0, "", Decimal(0))

# Squash every block of an INSERT into one, so that one INSERT is one part (atomic). The client
# sends ~2 MB blocks; the server would otherwise write a part per ~1M rows.
ONE_PART_SETTINGS: dict[str, Any] = {
    "min_insert_block_size_rows": 1 << 40,
    "min_insert_block_size_bytes": 1 << 50,
    "max_insert_block_size": 1 << 40,
    "async_insert": 0,
}
HEARTBEAT_COLUMNS = [
    "worker_id",
    "topic",
    "beat_at",
    "started_at",
    "state",
    "last_commit_at",
    "failing_since",
    "last_error",
    "partitions",
]


# The worker's ledger insert skips the pass that would first combine rows of one key within the
# block (``optimize_on_insert``): a link's kept events are one per (tenant, event id) already
# (the worker's dedupe), so the pass finds nothing to combine; a row that does repeat (a replay)
# is collapsed by the table's merges and by ``FINAL`` (readers that count use it), as a replay
# in another part always was. 2-9 % of the insert (docs/performance.md, "The store's calls of
# a flush").
EVENTS_INSERT_SETTINGS: dict[str, Any] = {"optimize_on_insert": 0}


def link_insert_settings(topic: str, partition: int, first: int) -> dict[str, Any]:
    """Settings of a link's commit insert: one part, deduplicated by the link's chain token.

    ``optimize_on_insert = 0``: the insert writes the rows sorted but does not first combine
    rows of one key. A link's minute rows are one per key already (the worker's windows); only
    its day rows of a key whose events span several minutes of one day repeat the key, and
    those are combined by the table's merges like rows of different links. Every read
    aggregates, so the answers are the same; the combining pass cost ~5-6 ms of a ~25-30 ms
    commit insert (docs/performance.md, "The commit insert without the combining pass")."""
    return {
        **ONE_PART_SETTINGS,
        "optimize_on_insert": 0,
        "insert_deduplication_token": chain_token(topic, partition, first),
    }


def unique_insert_settings() -> dict[str, Any]:
    """Settings of any other ``usage_minute`` insert: one part, never deduplicated (a fresh
    token: the table's deduplication log would otherwise drop a block identical to a recent
    one)."""
    return {**ONE_PART_SETTINGS, "insert_deduplication_token": f"once/{uuid.uuid4().hex}"}


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else from_epoch_ms(ms)


def progress_row(topic: str, partition: int, offset: int) -> tuple:
    return (
        "",
        PROGRESS_METER,
        topic,
        EPOCH,
        str(partition),
        "s",
        {},
        0,
        0,
        Decimal(0),
        None,
        None,
        [],
        NO_LATEST,
        offset,
    )


_PROGRESS_TEMPLATE: pa.Table | None = None
_CUSTOMER = USAGE_COLUMNS.index("customer")
_GROUP_KEY = USAGE_COLUMNS.index("group_key")
_SOURCE_OFFSET = USAGE_COLUMNS.index("source_offset")


def progress_table(topic: str, partition: int, offset: int) -> pa.Table:
    """``usage_table([progress_row(topic, partition, offset)])``, from a one-row template (the
    conversion of a Python row costs ~1.5 ms, paid at every link commit otherwise)."""
    global _PROGRESS_TEMPLATE
    if _PROGRESS_TEMPLATE is None:
        _PROGRESS_TEMPLATE = usage_table([progress_row("", 0, 0)])
    t = _PROGRESS_TEMPLATE
    for at, value, typ in (
        (_CUSTOMER, topic, pa.string()),
        (_GROUP_KEY, str(partition), pa.string()),
        (_SOURCE_OFFSET, offset, pa.int64()),
    ):
        t = t.set_column(at, USAGE_SCHEMA.field(at), pa.array([value], typ))
    return t


def _ms(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("epoch milliseconds must be an int", field="ms")
    return value


class ClickHouseSink(ActivationRows, DeadLetterRows):
    """Implements ``streams.sink.Sink`` (activation rows: ``clickhouse.activation``; dead
    letters: ``clickhouse.deadletters``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.database
        self._repo = Repo(store)

    # --- the worker's commit protocol (streams.sink.Sink) ----------------------------------
    def insert_events(self, events: pa.Table) -> None:
        """INSERT an ``EVENTS_SCHEMA`` batch (Arrow: no per-value Python encoding; rows of one
        key are not combined at insert, ``EVENTS_INSERT_SETTINGS``)."""
        self.store.insert_arrow("events", events, settings=EVENTS_INSERT_SETTINGS)

    def commit_link(
        self,
        topic: str,
        partition: int,
        first: int,
        last: int,
        usage: pa.Table,
    ) -> int:
        """One insert of ``usage``, its day rows and the progress row (see the module); returns
        the number of rows sent."""
        if last < first:
            raise ValidationError(
                f"a link must cover at least one offset (got {first}..{last})",
                details=[{"field": "last", "message": "must be >= first"}],
            )
        progress = progress_table(topic, partition, last)
        rows = pa.concat_tables([with_day_rows(usage), progress]) if usage.num_rows else progress
        self.store.insert_arrow(
            "usage_minute", rows, settings=link_insert_settings(topic, partition, first)
        )
        return rows.num_rows

    def read_chain(
        self, topic: str, partitions: list[int], since: ChainState | None = None
    ) -> ChainState:
        """Progress and claims of ``partitions`` in one query (``streams.sink.Sink``).

        With ``since`` (its ``mark`` the highest block number of the parts an earlier read took
        progress rows from), the progress half reads only the parts whose highest block number
        is above it (``PART_MAX_BLOCK``; the store drops the other parts before it opens any).
        Exact: ``usage_minute`` is a MergeTree that is not replicated, so a part gets its block
        numbers when it becomes visible, above those of every part visible before, and a merge
        keeps the highest of its sources; a progress row the earlier read did not see is in a
        part above its mark, and progress rows are never deleted (progress only grows). Why:
        a full read opens a granule of every active part: 5.8 ms with one part, 18.0 with 40
        (docs/performance.md, "The read of progress after a commit")."""
        parts = sorted({int(p) for p in partitions})
        base: dict[int, int] = {}
        mark = 0
        if since is not None and since.mark > 0 and all(p in since.progress for p in parts):
            base = {p: since.progress[p] for p in parts}
            mark = since.mark
        newer = f"AND {PART_MAX_BLOCK} > {{mark:UInt64}} " if base else ""
        rows = self.store.query_rows(
            "SELECT 'p', toInt32(group_key), max(source_offset), '', "
            f"max({PART_MAX_BLOCK}) "
            f"FROM {self.db}.usage_minute "
            "WHERE tenant_id = '' AND meter_id = {meter:String} AND customer = {topic:String} "
            f"AND has({{keys:Array(String)}}, group_key) {newer}GROUP BY group_key "
            "UNION ALL "
            "SELECT 'c', partition, toInt64(max(epoch)), argMax(owner, (epoch, owner)), "
            "toUInt64(0) "
            f"FROM {self.db}.worker_claims "
            "WHERE topic = {topic:String} AND has({parts:Array(Int32)}, partition) "
            "GROUP BY partition",
            {
                "meter": PROGRESS_METER,
                "topic": topic,
                "keys": [str(p) for p in parts],
                "parts": parts,
                "mark": mark,
            },
        )
        progress = dict(base)
        claims: dict[int, Claim] = {}
        for kind, part, value, owner, block in rows:
            if kind == "p":
                progress[int(part)] = max(int(value), progress.get(int(part), -1))
                mark = max(mark, int(block))
            else:
                claims[int(part)] = Claim(int(value), str(owner))
        return ChainState(progress, claims, mark)

    def write_claim(self, topic: str, partition: int, epoch: int, owner: str) -> None:
        self.store.insert(
            "worker_claims",
            [(topic, partition, epoch, owner, from_epoch_ms(epoch))],
            ["topic", "partition", "epoch", "owner", "claimed_at"],
        )

    def write_heartbeat(self, status: WorkerStatus) -> None:
        self.store.insert(
            "worker_heartbeats",
            [
                (
                    status.worker_id,
                    status.topic,
                    from_epoch_ms(status.beat_ms),
                    from_epoch_ms(status.started_ms),
                    status.state,
                    _dt(status.last_commit_ms),
                    _dt(status.failing_since_ms),
                    status.last_error[:1000],
                    list(status.partitions),
                )
            ],
            HEARTBEAT_COLUMNS,
        )

    def heartbeats(self, topic: str, since_ms: int) -> list[WorkerStatus]:
        """The newest heartbeat of every worker of ``topic`` that beat at or after ``since_ms``."""
        rows = self.store.query_rows(
            "SELECT worker_id, topic, toUnixTimestamp64Milli(beat_at), "
            "toUnixTimestamp64Milli(started_at), state, toUnixTimestamp64Milli(last_commit_at), "
            "toUnixTimestamp64Milli(failing_since), last_error, partitions "
            f"FROM {self.db}.worker_heartbeats FINAL "
            "WHERE topic = {topic:String} "
            "AND beat_at >= fromUnixTimestamp64Milli({since:Int64}, 'UTC') "
            "ORDER BY worker_id",
            {"topic": topic, "since": _ms(since_ms)},
        )
        return [
            WorkerStatus(
                worker_id=w,
                topic=t,
                state=str(state),
                beat_ms=int(beat),
                started_ms=int(started),
                last_commit_ms=None if commit is None else int(commit),
                failing_since_ms=None if failing is None else int(failing),
                last_error=err,
                partitions=tuple(int(p) for p in parts),
            )
            for w, t, beat, started, state, commit, failing, err, parts in rows
        ]

    def commit(
        self,
        topic: str,
        events_rows: list[tuple],
        usage_rows: list[tuple],
        progress: dict[int, int],
    ) -> None:
        """Write rows outside the worker's chain (tests, tools): the events, then the usage rows
        and progress rows in one insert that is never deduplicated. Not the worker's commit."""
        if events_rows:
            self.store.insert("events", events_rows, EVENTS_COLUMNS)
        rows = [*usage_rows, *(progress_row(topic, p, o) for p, o in sorted(progress.items()))]
        if rows:
            self.store.insert_arrow(
                "usage_minute",
                with_day_rows(usage_table(rows)),
                settings=unique_insert_settings(),
            )

    def progress(self, topic: str) -> dict[int, int]:
        rows = self.store.query_rows(
            f"SELECT group_key, max(source_offset) FROM {self.db}.usage_minute "
            "WHERE tenant_id = '' AND meter_id = {meter:String} AND customer = {topic:String} "
            "GROUP BY group_key",
            {"meter": PROGRESS_METER, "topic": topic},
        )
        return {int(k): int(v) for k, v in rows}

    def progress_all(self) -> dict[str, dict[int, int]]:
        rows = self.store.query_rows(
            f"SELECT customer, group_key, max(source_offset) FROM {self.db}.usage_minute "
            "WHERE tenant_id = '' AND meter_id = {meter:String} GROUP BY customer, group_key",
            {"meter": PROGRESS_METER},
        )
        out: dict[str, dict[int, int]] = {}
        for topic, part, off in rows:
            out.setdefault(topic, {})[int(part)] = int(off)
        return out

    def seen_ids(
        self,
        topic: str,
        partition: int,
        after_offset: int,
        upto_offset: int,
        since_ingested_ms: int,
    ) -> Iterator[list[tuple[str, str]]]:
        """``(tenant_id, event_id)`` chunks with ``after < source_offset <= upto`` (cross-tenant:
        it rebuilds the partition's dedupe index)."""
        yield from self.store.stream_rows(
            f"SELECT tenant_id, event_id FROM {self.db}.events "
            "WHERE source_topic = {topic:String} AND source_partition = {partition:Int32} "
            "AND source_offset > {after:Int64} AND source_offset <= {upto:Int64} "
            "AND ingested_at >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')",
            {
                "topic": topic,
                "partition": partition,
                "after": after_offset,
                "upto": upto_offset,
                "since": _ms(since_ingested_ms),
            },
        )

    def all_meters(self) -> list[Meter]:
        return self._repo.all_meters()
