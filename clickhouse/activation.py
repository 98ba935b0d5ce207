"""Meter activation rows (``meter_activations``, migration 030): written and read by the worker.

``ActivationRows`` is mixed into ``clickhouse.sink.ClickHouseSink`` (it needs ``self.store`` and
``self.db``); the backfill reads the same table through ``clickhouse.backfill``.

Activation row::

    (tenant_id, meter_id, topic, partition, marker_offset)

the position of the first ``activate_meter`` marker of the meter the worker processed in that
partition. The worker writes it in the flush that holds the marker, before the flush's commit
point; a replay of the flush writes the identical row again (``ReplacingMergeTree`` collapses
it, readers take ``min(marker_offset)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clickhouse.store import Store

ACTIVATION_COLUMNS = ["tenant_id", "meter_id", "topic", "source_partition", "marker_offset"]

ActivationRow = tuple[str, str, str, int, int]


class ActivationRows:
    """``record_activations`` / ``activations`` of ``streams.sink.Sink``."""

    store: Store
    db: str

    def record_activations(self, rows: list[ActivationRow]) -> None:
        """Insert activation rows (idempotent: identical rows collapse, readers take the min)."""
        if rows:
            self.store.insert("meter_activations", list(rows), ACTIVATION_COLUMNS)

    def activations(self, topic: str, partition: int, upto_offset: int) -> dict[str, int]:
        """meter id -> offset of its first marker in ``topic``/``partition``, for markers at or
        below ``upto_offset`` (the partition's committed progress). Cross-tenant (meter ids are
        unique): the worker rebuilds a partition's active meters from it on assignment."""
        rows = self.store.query_rows(
            f"SELECT meter_id, min(marker_offset) FROM {self.db}.meter_activations "
            "WHERE topic = {topic:String} AND source_partition = {partition:Int32} "
            "AND marker_offset <= {upto:Int64} GROUP BY meter_id",
            {"topic": topic, "partition": int(partition), "upto": int(upto_offset)},
        )
        return {str(m): int(o) for m, o in rows}
