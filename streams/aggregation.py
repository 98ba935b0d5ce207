"""Event-time minute aggregation (pure).

Each (tenant, meter, customer, group_key, minute) window accumulates a ``MinuteAggregate``: matched
events, value count/sum/min/max, the exact set of unique values and the latest
``(time_ms, event_id, value)``. The window of an event is its own time floored to the UTC minute,
so late events fold into their own window and DST never matters.

Aggregates are commutative monoids: merging partial aggregates of any split of a stream equals the
aggregate of the whole (this is what lets ClickHouse merge the per-flush deltas with
sum/min/max/groupUniqArray/max). ``AGGREGATORS`` gives the per-kind ``initialize/add/result``
view used to read a meter's value out of an aggregate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Context, Decimal
from typing import Any

from schemas.meters import Aggregation
from schemas.timeutil import epoch_ms, from_epoch_ms
from streams.matching import Contribution

MINUTE_MS = 60_000
ORIGIN_STREAM = "s"
NO_LATEST: tuple[int, str, Decimal] = (0, "", Decimal(0))

# Sums of Decimal(38, 9) values need more than the default 28 digits.
_CTX = Context(prec=80)


def window_start_ms(time_ms: int) -> int:
    """Floor of an epoch-ms timestamp to its UTC minute (correct for negative times too)."""
    return time_ms - time_ms % MINUTE_MS


Latest = tuple[int, str, Decimal]


@dataclass(slots=True)
class MinuteAggregate:
    events: int = 0
    value_count: int = 0
    value_sum: Decimal = field(default_factory=lambda: Decimal(0))
    value_min: Decimal | None = None
    value_max: Decimal | None = None
    uniq: set[str] = field(default_factory=set)
    latest: Latest | None = None

    def add(
        self,
        value: Decimal | None = None,
        uniq: str | None = None,
        latest_key: tuple[int, str] | None = None,
    ) -> None:
        """Fold one matched event in. ``latest_key`` = (time_ms, event_id) for latest meters."""
        self.events += 1
        if value is not None:
            self.value_count += 1
            self.value_sum = _CTX.add(self.value_sum, value)
            if self.value_min is None or value < self.value_min:
                self.value_min = value
            if self.value_max is None or value > self.value_max:
                self.value_max = value
            if latest_key is not None:
                cand = (latest_key[0], latest_key[1], value)
                if self.latest is None or cand > self.latest:
                    self.latest = cand
        if uniq is not None:
            self.uniq.add(uniq)

    def merge(self, other: MinuteAggregate) -> MinuteAggregate:
        """Fold another partial aggregate in (in place); returns self."""
        self.events += other.events
        self.value_count += other.value_count
        self.value_sum = _CTX.add(self.value_sum, other.value_sum)
        if other.value_min is not None and (
            self.value_min is None or other.value_min < self.value_min
        ):
            self.value_min = other.value_min
        if other.value_max is not None and (
            self.value_max is None or other.value_max > self.value_max
        ):
            self.value_max = other.value_max
        self.uniq |= other.uniq
        if other.latest is not None and (self.latest is None or other.latest > self.latest):
            self.latest = other.latest
        return self


# --- per-kind view: initialize / add / result -------------------------------------------------


class Aggregator:
    """The value of one aggregation kind, read from a MinuteAggregate."""

    kind: Aggregation

    def initialize(self) -> MinuteAggregate:
        return MinuteAggregate()

    def add(self, state: MinuteAggregate, c: Contribution, time_ms: int, event_id: str) -> None:
        state.add(c.value, c.uniq, (time_ms, event_id) if self.kind == Aggregation.LATEST else None)

    def result(self, state: MinuteAggregate) -> Decimal | None:
        raise NotImplementedError


class CountAggregator(Aggregator):
    kind = Aggregation.COUNT

    def result(self, state: MinuteAggregate) -> Decimal | None:
        return Decimal(state.events)


class SumAggregator(Aggregator):
    kind = Aggregation.SUM

    def result(self, state: MinuteAggregate) -> Decimal | None:
        return state.value_sum


class AvgAggregator(Aggregator):
    kind = Aggregation.AVG

    def result(self, state: MinuteAggregate) -> Decimal | None:
        if not state.value_count:
            return None
        return _CTX.divide(state.value_sum, Decimal(state.value_count))


class MinAggregator(Aggregator):
    kind = Aggregation.MIN

    def result(self, state: MinuteAggregate) -> Decimal | None:
        return state.value_min


class MaxAggregator(Aggregator):
    kind = Aggregation.MAX

    def result(self, state: MinuteAggregate) -> Decimal | None:
        return state.value_max


class UniqueCountAggregator(Aggregator):
    kind = Aggregation.UNIQUE_COUNT

    def result(self, state: MinuteAggregate) -> Decimal | None:
        return Decimal(len(state.uniq))


class LatestAggregator(Aggregator):
    kind = Aggregation.LATEST

    def result(self, state: MinuteAggregate) -> Decimal | None:
        return state.latest[2] if state.latest is not None else None


AGGREGATORS: dict[Aggregation, Aggregator] = {
    a.kind: a
    for a in (
        CountAggregator(),
        SumAggregator(),
        AvgAggregator(),
        MinAggregator(),
        MaxAggregator(),
        UniqueCountAggregator(),
        LatestAggregator(),
    )
}


# --- the per-batch window table ---------------------------------------------------------------

WindowKey = tuple[str, str, str, str, int]  # tenant, meter_id, customer, group_key, window ms


class WindowTable:
    """Minute windows of one flush; ``rows()`` gives the usage rows (deltas) to insert."""

    __slots__ = ("_group_values", "windows")

    def __init__(self) -> None:
        self.windows: dict[WindowKey, MinuteAggregate] = {}
        self._group_values: dict[WindowKey, dict[str, str]] = {}

    def add(
        self, tenant_id: str, customer: str, time_ms: int, event_id: str, c: Contribution
    ) -> None:
        meter = c.meter
        key = (tenant_id, meter.id, customer, c.group_key, time_ms - time_ms % MINUTE_MS)
        state = self.windows.get(key)
        if state is None:
            state = self.windows[key] = MinuteAggregate()
            self._group_values[key] = c.group_values
        state.add(
            c.value,
            c.uniq,
            (time_ms, event_id) if meter.aggregation == Aggregation.LATEST else None,
        )

    def __len__(self) -> int:
        return len(self.windows)

    def rows(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for key, st in self.windows.items():
            tenant_id, meter_id, customer, group_key, wms = key
            out.append(
                (
                    tenant_id,
                    meter_id,
                    customer,
                    from_epoch_ms(wms),
                    group_key,
                    ORIGIN_STREAM,
                    self._group_values[key],
                    st.events,
                    st.value_count,
                    st.value_sum,
                    st.value_min,
                    st.value_max,
                    sorted(st.uniq),
                    st.latest if st.latest is not None else NO_LATEST,
                    0,
                )
            )
        return out


def aggregate_from_row(row: tuple[Any, ...]) -> MinuteAggregate:
    """The MinuteAggregate a usage row carries (inverse of ``WindowTable.rows`` per row)."""
    latest = row[13]
    return MinuteAggregate(
        events=row[7],
        value_count=row[8],
        value_sum=row[9],
        value_min=row[10],
        value_max=row[11],
        uniq=set(row[12]),
        latest=None if tuple(latest) == NO_LATEST else tuple(latest),
    )


def merge_rows(rows: Iterable[tuple[Any, ...]]) -> dict[WindowKey, MinuteAggregate]:
    """Merge usage rows by window key the way the store does (for tests and tools)."""
    out: dict[WindowKey, MinuteAggregate] = {}
    for row in rows:
        ws = row[3]
        key = (row[0], row[1], row[2], row[4], epoch_ms(ws))
        agg = aggregate_from_row(row)
        if key in out:
            out[key].merge(agg)
        else:
            out[key] = agg
    return out
