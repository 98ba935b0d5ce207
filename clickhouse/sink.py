"""The worker's sink: flush commit, progress, dedupe-index rebuild (``streams.sink.Sink``).

Row tuple formats (positional, in the column order below; produced by ``streams``):

events row (``EVENTS_COLUMNS``)::

    (tenant_id: str, event_id: str, event_type: str, customer: str,
     time: aware datetime UTC, properties: JSON object text, ingested_at: aware datetime UTC,
     source_topic: str, source_partition: int, source_offset: int, source_index: int)

usage row (``USAGE_COLUMNS``)::

    (tenant_id: str, meter_id: str, customer: str, window_start: aware datetime UTC (whole minute),
     group_key: str (canonical JSON of group_values, '' without group_by),
     origin: str ('s' = stream, 'b:<run id>' = backfill), group_values: dict[str, str],
     events: int, value_count: int, value_sum: Decimal, value_min: Decimal | None,
     value_max: Decimal | None, uniq_values: list[str],
     latest: (time_ms: int, event_id: str, value: Decimal)  -- (0, '', Decimal(0)) if none,
     source_offset: int)

Commit (one flush): 1) INSERT the events rows into ``events`` (idempotent: a replay writes the
same rows, which ``ReplacingMergeTree`` collapses); 2) ONE INSERT into ``usage_minute`` of the
usage rows plus one progress row per partition (``tenant_id=''``, ``meter_id='~progress'``,
``customer=<topic>``, ``group_key=<partition>``, ``source_offset=<offset>``). ``usage_minute`` has
no ``PARTITION BY`` and the insert settings squash all blocks into one, so the insert is one part:
atomic. That insert is the commit point of the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from clickhouse.activation import ActivationRows
from clickhouse.repo import Repo
from clickhouse.store import Store
from schemas.meters import Meter
from tally.errors import ValidationError

log = logging.getLogger(__name__)

EVENTS_COLUMNS = [
    "tenant_id",
    "event_id",
    "event_type",
    "customer",
    "time",
    "properties",
    "ingested_at",
    "source_topic",
    "source_partition",
    "source_offset",
    "source_index",
]
USAGE_COLUMNS = [
    "tenant_id",
    "meter_id",
    "customer",
    "window_start",
    "group_key",
    "origin",
    "group_values",
    "events",
    "value_count",
    "value_sum",
    "value_min",
    "value_max",
    "uniq_values",
    "latest",
    "source_offset",
]
PROGRESS_METER = "~progress"
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


def _ms(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("epoch milliseconds must be an int", details={"field": "ms"})
    return value


class ClickHouseSink(ActivationRows):
    """Implements ``streams.sink.Sink`` (activation rows: ``clickhouse.activation``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.database
        self._repo = Repo(store)

    def commit(
        self,
        topic: str,
        events_rows: list[tuple],
        usage_rows: list[tuple],
        progress: dict[int, int],
    ) -> None:
        if events_rows:
            self.store.insert("events", events_rows, EVENTS_COLUMNS)
        rows = list(usage_rows)
        rows.extend(progress_row(topic, p, o) for p, o in sorted(progress.items()))
        if rows:
            self.store.insert("usage_minute", rows, USAGE_COLUMNS, settings=ONE_PART_SETTINGS)

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
