"""The commit protocol between the worker and the store (implemented by clickhouse.sink).

The worker commits per Kafka partition, as a chain of *links*: a link covers offsets
``[first, last]`` of one partition, where ``first`` is one past the end of the chain the worker
knows. Its commit is ONE insert into ``usage_minute`` of the link's usage rows plus the
partition's progress row (``source_offset = last``), with the insert deduplication token
``chain_token(topic, partition, first)``. Two writers that extend the chain from the same point
use the same token, and the store keeps exactly one of their links (docs/architecture.md).

Batches are Arrow tables with the schemas of ``schemas.columns`` (``EVENTS_SCHEMA``: the ledger
rows, times as epoch-ms timestamps; ``USAGE_SCHEMA``: the per-minute usage deltas, ``origin = 's'``,
``group_key`` = canonical JSON of ``group_values`` (sorted keys; ``''`` without group_by),
``latest`` = ``(time_ms, event_id, value)`` or ``(0, '', 0)``, ``source_offset`` = 0: progress rows
carry the offsets). ``schemas.columns.EventRow`` / ``UsageRow`` name the same columns as Python
values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import pyarrow as pa

from schemas.deadletters import DeadLetterRow
from schemas.meters import Meter
from schemas.worker import ChainState, WorkerStatus, chain_token

__all__ = ["Sink", "chain_token"]


@runtime_checkable
class Sink(Protocol):
    def insert_events(self, events: pa.Table) -> None:
        """INSERT ledger rows (``EVENTS_SCHEMA``) (idempotent: a replay writes identical rows, collapsed by key)."""
        ...

    def commit_link(
        self,
        topic: str,
        partition: int,
        first: int,
        last: int,
        usage: pa.Table,
    ) -> int:
        """The commit point of one link: ONE insert (atomic) of ``usage`` (``USAGE_SCHEMA``) plus the progress
        row ``(topic, partition, last)``, with the token ``chain_token(topic, partition, first)``.
        Returns the number of rows the insert sent (the store may add rows of its own layout,
        e.g. day rows). Raises on failure; the insert may have landed anyway (answer lost) or
        land later."""
        ...

    def read_chain(
        self, topic: str, partitions: list[int], since: ChainState | None = None
    ) -> ChainState:
        """Progress and newest claim of ``partitions``, in one read.

        ``since``: an earlier state of these partitions (a read, or the smallest ``mark`` of
        several reads with the progress each showed). With it, the store may read only what
        landed after ``since.mark`` and answer each partition's progress as the larger of
        ``since.progress[p]`` and that: the same answer as a full read, because progress only
        grows. Claims are always read whole. A partition ``since`` has no progress for, or a
        ``mark`` of 0, means a full read."""
        ...

    def write_claim(self, topic: str, partition: int, epoch: int, owner: str) -> None:
        """Record that ``owner`` owns the partition from ``epoch`` (wall ms) on."""
        ...

    def write_heartbeat(self, status: WorkerStatus) -> None:
        """Record the worker's status (read by scale-out API processes for /readyz)."""
        ...

    def progress(self, topic: str) -> dict[int, int]:
        """Last committed offset per partition of ``topic`` (partitions never flushed absent)."""
        ...

    def progress_all(self) -> dict[str, dict[int, int]]:
        """``progress`` of every topic ever committed (topic generations of embedded mode)."""
        ...

    def seen_ids(
        self,
        topic: str,
        partition: int,
        after_offset: int,
        upto_offset: int,
        since_ingested_ms: int,
    ) -> Iterator[list[tuple[str, str]]]:
        """Chunks of ``(tenant_id, event_id)`` stored from ``topic``/``partition`` with
        ``after_offset < source_offset <= upto_offset`` and ingested at or after
        ``since_ingested_ms`` (used to rebuild the local dedupe index)."""
        ...

    def all_meters(self) -> list[Meter]:
        """Every live meter of every tenant (the worker's one cross-tenant read)."""
        ...

    def record_activations(self, rows: list[tuple[str, str, str, int, int]]) -> None:
        """Store ``(tenant_id, meter_id, topic, partition, marker_offset)`` rows: the first
        activation marker of a meter in a partition. Called in the flush that holds the marker,
        before ``commit``; idempotent (a replay writes the same rows)."""
        ...

    def activations(self, topic: str, partition: int, upto_offset: int) -> dict[str, int]:
        """meter id -> offset of its first activation marker in ``topic``/``partition``, for
        markers at or below ``upto_offset`` (the partition's committed progress)."""
        ...

    def record_dead_letters(self, rows: list[DeadLetterRow]) -> None:
        """Store dead-letter rows (``schemas.deadletters.DEAD_LETTER_COLUMNS``). Called in the
        flush that holds them, before the links' commits; idempotent (a replay writes the same
        rows, keyed by source position)."""
        ...
