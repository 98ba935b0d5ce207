"""An in-memory Sink for pure unit tests of the processor (integration tests use the real one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from schemas.columns import event_rows, usage_rows
from schemas.meters import Meter
from schemas.timeutil import epoch_ms
from schemas.worker import ChainState, Claim, WorkerStatus, chain_token


class MemorySink:
    """The store of the commit protocol in memory, with the deduplication by chain token that
    ClickHouse gives ``usage_minute`` and fault knobs:

    - ``fail_next``: the next N link commits raise before storing anything;
    - ``fail_after_next``: the next N link commits store, then raise (answer lost);
    - ``late_next``: the next N link commits raise a timeout and land only when
      ``land_late()`` is called (an insert that lands after its client gave up);
    - ``fail_reads``: the next N ``read_chain`` calls raise;
    - ``fail_events_next``: the next N events inserts raise;
    - ``other_writer(...)``: another worker's link lands (same token rule).

    Every landing gets the next block number, as a store part does: ``read_chain`` with
    ``since`` sees only landings above ``since.mark`` (plus ``since.progress``), as
    ``ClickHouseSink`` reads only the newer parts. ``since_reads`` counts those reads.
    """

    def __init__(self, meters: list[Meter] | None = None) -> None:
        self.meters = list(meters or [])
        self.events: dict[tuple[str, str], tuple[Any, ...]] = {}
        self.usage: list[tuple[Any, ...]] = []
        self._progress: dict[str, dict[int, int]] = {}
        self._landings: list[tuple[int, str, int, int]] = []  # (block, topic, partition, last)
        self.since_reads = 0
        self.tokens: set[str] = set()
        self.claims: dict[tuple[str, int], Claim] = {}
        self.heartbeats: list[WorkerStatus] = []
        self.commits = 0  # links stored
        self.deduplicated = 0  # link commits that were no-ops (token already stored)
        self.link_calls = 0
        self.fail_next = 0
        self.fail_after_next = 0
        self.late_next = 0
        self.fail_reads = 0
        self.fail_events_next = 0
        self.late: list[Callable[[], None]] = []
        self.meter_loads = 0
        self.fail_meter_loads = 0
        self.fail_activations_next = 0
        self.activation_rows: list[tuple[str, str, str, int, int]] = []
        self.dead_letters: dict[tuple[str, str], tuple[Any, ...]] = {}  # (tenant, id) -> row
        self.dead_letter_inserts = 0
        self.fail_dead_letters_next = 0
        self.events_inserts = 0  # calls of insert_events that landed

    # --- the protocol ---------------------------------------------------------------------
    def insert_events(self, events: pa.Table | list[tuple[Any, ...]]) -> None:
        if self.fail_events_next:
            self.fail_events_next -= 1
            raise ConnectionError("store down (events)")
        rows = event_rows(events) if isinstance(events, pa.Table) else events
        for r in rows:
            self.events[(r[0], r[1])] = r
        self.events_inserts += 1

    def _land(self, topic: str, p: int, first: int, last: int, rows: list[tuple[Any, ...]]) -> None:
        token = chain_token(topic, p, first)
        if token in self.tokens:
            self.deduplicated += 1
            return
        self.tokens.add(token)
        self.usage.extend(rows)
        cur = self._progress.setdefault(topic, {})
        cur[p] = max(cur.get(p, -1), last)
        self._landings.append((len(self._landings) + 1, topic, p, last))
        self.commits += 1

    def commit_link(
        self, topic: str, partition: int, first: int, last: int, usage: pa.Table
    ) -> int:
        self.link_calls += 1
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("store down")
        rows: list[tuple[Any, ...]] = list(usage_rows(usage))
        if self.late_next:
            self.late_next -= 1
            self.late.append(lambda: self._land(topic, partition, first, last, rows))
            raise TimeoutError("no answer in time (the insert is still running)")
        self._land(topic, partition, first, last, rows)
        if self.fail_after_next:
            self.fail_after_next -= 1
            raise TimeoutError("answer lost")
        return len(rows) + 1  # + the progress row

    def land_late(self) -> None:
        late, self.late = self.late, []
        for fn in late:
            fn()

    def other_writer(
        self, topic: str, partition: int, first: int, last: int, rows: list[tuple[Any, ...]]
    ) -> None:
        """Another worker's link (e.g. a zombie's, or the new owner's) lands."""
        self._land(topic, partition, first, last, list(rows))

    def read_chain(
        self, topic: str, partitions: list[int], since: ChainState | None = None
    ) -> ChainState:
        if self.fail_reads:
            self.fail_reads -= 1
            raise ConnectionError("store down (read)")
        claims = {p: self.claims[(topic, p)] for p in partitions if (topic, p) in self.claims}
        mine = [(b, p, last) for b, t, p, last in self._landings if t == topic and p in partitions]
        if since is not None and since.mark > 0 and all(p in since.progress for p in partitions):
            self.since_reads += 1
            progress = {p: since.progress[p] for p in partitions}
            for b, p, last in mine:
                if b > since.mark:
                    progress[p] = max(progress[p], last)
            return ChainState(progress, claims, max([since.mark, *(b for b, _, _ in mine)]))
        cur = self._progress.get(topic, {})
        progress = {p: cur[p] for p in partitions if p in cur}
        return ChainState(progress, claims, max((b for b, _, _ in mine), default=0))

    def write_claim(self, topic: str, partition: int, epoch: int, owner: str) -> None:
        old = self.claims.get((topic, partition))
        if old is None or (epoch, owner) > (old.epoch, old.owner):
            self.claims[(topic, partition)] = Claim(epoch, owner)

    def write_heartbeat(self, status: WorkerStatus) -> None:
        self.heartbeats.append(status)

    def commit(
        self,
        topic: str,
        events_rows: list[tuple[Any, ...]],
        usage_rows: list[tuple[Any, ...]],
        progress: dict[int, int],
    ) -> None:
        """Rows written outside the chain (test set-up), like ClickHouseSink.commit."""
        self.insert_events(events_rows)
        self.usage.extend(usage_rows)
        cur = self._progress.setdefault(topic, {})
        for p, off in progress.items():
            cur[p] = max(cur.get(p, -1), off)
            self._landings.append((len(self._landings) + 1, topic, p, off))

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

    def record_dead_letters(self, rows: list[tuple[Any, ...]]) -> None:
        """Like the table: rows keyed by (tenant, dead letter id), a replay collapses."""
        if self.fail_dead_letters_next:
            self.fail_dead_letters_next -= 1
            raise ConnectionError("store down (dead letters)")
        self.dead_letter_inserts += 1
        for r in rows:
            self.dead_letters[(r[0], r[1])] = r

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
