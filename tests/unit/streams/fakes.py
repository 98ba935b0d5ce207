"""An in-memory Sink for pure unit tests of the processor (integration tests use the real one)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from schemas.meters import Meter
from schemas.timeutil import epoch_ms


class MemorySink:
    def __init__(self, meters: list[Meter] | None = None) -> None:
        self.meters = list(meters or [])
        self.events: dict[tuple[str, str], tuple[Any, ...]] = {}
        self.usage: list[tuple[Any, ...]] = []
        self._progress: dict[str, dict[int, int]] = {}
        self.commits = 0
        self.fail_next = 0  # raise before storing
        self.fail_after_next = 0  # store, then raise (an ambiguous failure)
        self.meter_loads = 0
        self.fail_meter_loads = 0
        self.fail_activations_next = 0
        self.activation_rows: list[tuple[str, str, str, int, int]] = []

    def commit(
        self,
        topic: str,
        events_rows: list[tuple[Any, ...]],
        usage_rows: list[tuple[Any, ...]],
        progress: dict[int, int],
    ) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("store down")
        for r in events_rows:
            self.events[(r[0], r[1])] = r
        self.usage.extend(usage_rows)
        cur = self._progress.setdefault(topic, {})
        for p, off in progress.items():
            cur[p] = max(cur.get(p, -1), off)
        self.commits += 1
        if self.fail_after_next:
            self.fail_after_next -= 1
            raise TimeoutError("answer lost")

    def progress(self, topic: str) -> dict[int, int]:
        return dict(self._progress.get(topic, {}))

    def progress_all(self) -> dict[str, dict[int, int]]:
        return {t: dict(p) for t, p in self._progress.items()}

    def seen_ids(
        self,
        topic: str,
        partition: int,
        after_offset: int,
        upto_offset: int,
        since_ingested_ms: int,
    ) -> Iterator[list[tuple[str, str]]]:
        out = [
            (r[0], r[1])
            for r in self.events.values()
            if r[7] == topic
            and r[8] == partition
            and after_offset < r[9] <= upto_offset
            and epoch_ms(r[6]) >= since_ingested_ms
        ]
        for i in range(0, len(out), 3):
            yield out[i : i + 3]

    def all_meters(self) -> list[Meter]:
        if self.fail_meter_loads:
            self.fail_meter_loads -= 1
            raise ConnectionError("store down (meter reload)")
        self.meter_loads += 1
        return list(self.meters)

    def record_activations(self, rows: list[tuple[str, str, str, int, int]]) -> None:
        if self.fail_activations_next:
            self.fail_activations_next -= 1
            raise ConnectionError("store down (activation rows)")
        self.activation_rows.extend(rows)

    def activations(self, topic: str, partition: int, upto_offset: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for _t, meter_id, top, p, off in self.activation_rows:
            if top == topic and p == partition and off <= upto_offset:
                out[meter_id] = min(off, out.get(meter_id, off))
        return out


def meter(
    slug: str = "m",
    *,
    aggregation: str = "count",
    event_type: str = "api",
    value_property: str | None = None,
    group_by: dict[str, str] | None = None,
    filters: list[dict[str, Any]] | None = None,
    tenant_id: str = "t1",
    created_at: datetime | None = None,
    meter_id: str | None = None,
    activation_topic: str = "",
) -> Meter:
    return Meter(
        slug=slug,
        event_type=event_type,
        aggregation=aggregation,  # type: ignore[arg-type]
        value_property=value_property,
        group_by=group_by or {},
        filters=filters or [],  # type: ignore[arg-type]
        id=meter_id or f"id-{slug}",
        tenant_id=tenant_id,
        created_at=created_at or datetime(2020, 1, 1, tzinfo=UTC),
        activation_topic=activation_topic,
    )


def envelope_rows(
    topic: str,
    partition: int,
    items: list[tuple[int, str]],
    *,
    tenant: str = "t1",
    ingested_ms: int = 1_700_000_000_000,
) -> list[tuple[Any, ...]]:
    """Events rows for (offset, event_id) items, as the processor would build them."""
    ing = datetime.fromtimestamp(ingested_ms / 1000, UTC)
    return [
        (tenant, eid, "api", "c1", ing, "{}", ing, topic, partition, off, 0) for off, eid in items
    ]
