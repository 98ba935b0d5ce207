"""Records of event corrections shared by ``billing.corrections`` (the use-case),
``api.matching`` (the worker's matching rules applied to stored events) and
``clickhouse.corrections`` (the rows). See docs/invoicing.md, "Corrections".

Sides: an event counts for a meter either in the stream (its log position is after the meter's
activation marker: ``STREAM``) or in backfill runs (before it: ``BACKFILL``).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

from schemas.meters import Aggregation

STREAM = "s"
BACKFILL = "b"

# Aggregations whose value is a sum of per-event contributions: a correction is exact as a
# signed delta of (events, value_count, value_sum). The others are corrected by overriding the
# affected minute windows with their recomputation from the ledger.
ADDITIVE: frozenset[Aggregation] = frozenset({Aggregation.COUNT, Aggregation.SUM, Aggregation.AVG})

NO_LATEST: tuple[int, str, Decimal] = (0, "", Decimal(0))

# (topic, partition) -> offset of the meter's first activation marker there
Markers = dict[tuple[str, int], int]


class LedgerEvent(NamedTuple):
    """A row of the ledger (``events``) with its log position."""

    id: str
    type: str
    customer: str
    time_ms: int
    properties: dict[str, Any]
    topic: str
    partition: int
    offset: int


class Effect(NamedTuple):
    """One effect row of a correction: the signed change of one (meter, group, side) in the
    event's minute window (for min/max/unique_count/latest meters it marks the window dirty)."""

    meter_id: str
    customer: str
    window_start: datetime
    group_key: str
    side: str
    group_values: dict[str, str]
    events: int
    value_count: int
    value_sum: Decimal


class WindowAggregate(NamedTuple):
    """A minute window recomputed from the ledger (the columns of a usage row)."""

    group_values: dict[str, str]
    events: int = 0
    value_count: int = 0
    value_sum: Decimal = Decimal(0)
    value_min: Decimal | None = None
    value_max: Decimal | None = None
    uniq: tuple[str, ...] = ()
    latest: tuple[int, str, Decimal] = NO_LATEST


class Override(NamedTuple):
    """A recomputed minute window of one (meter, customer, group, side)."""

    meter_id: str
    customer: str
    window_start: datetime
    group_key: str
    side: str
    seq: int
    base_events: int
    aggregate: WindowAggregate
