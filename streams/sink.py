"""The flush protocol between the worker and the store (implemented by clickhouse.sink).

Row formats (positional tuples, in column order of the tables):

events row::

    (tenant_id, event_id, event_type, customer, time, properties_json, ingested_at,
     source_topic, source_partition, source_offset, source_index)

``time`` and ``ingested_at`` are aware UTC datetimes, ``properties_json`` is orjson text.

usage row::

    (tenant_id, meter_id, customer, window_start, group_key, origin, group_values,
     events, value_count, value_sum, value_min, value_max, uniq_values, latest, source_offset)

``group_key`` is the canonical JSON of ``group_values`` (sorted keys; ``''`` without group_by),
``origin`` is ``'s'`` for the stream, ``latest`` is ``(time_ms, event_id, value)`` or
``(0, '', Decimal(0))``, ``source_offset`` is 0 (progress rows carry the offsets).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from schemas.meters import Meter


@runtime_checkable
class Sink(Protocol):
    def commit(
        self,
        topic: str,
        events_rows: list[tuple],
        usage_rows: list[tuple],
        progress: dict[int, int],
    ) -> None:
        """Store one flush: INSERT the events, then the usage rows + progress rows in ONE insert
        (the commit point). Raise on failure; the caller retries the same batch."""
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
