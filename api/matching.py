"""The worker's rules applied to stored events, for event corrections (``billing.corrections``
takes a ``WorkerMatching``; billing itself does not import the stream code):

- matching (``streams.matching``): what an event adds to each meter;
- the stream/backfill boundary (``streams.activation.meter_applies`` with the activation rows):
  which side counts the event for each meter;
- minute aggregation (``streams.aggregation.MinuteAggregate``): a window recomputed from the
  ledger for the meters a delta cannot correct (min, max, unique_count, latest).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from billing.corrections import Contribution
from schemas.corrections import BACKFILL, NO_LATEST, STREAM, LedgerEvent, Markers, WindowAggregate
from schemas.envelope import EnvelopeEvent
from schemas.meters import Aggregation, Meter
from streams.activation import meter_applies
from streams.aggregation import MINUTE_MS, MinuteAggregate
from streams.matching import CompiledMeter, ValueProblem


def side_of(meter: Meter, event: LedgerEvent, markers: Markers) -> str:
    """``STREAM`` if the stream counts ``event`` for ``meter`` (its position is after the
    meter's activation marker), else ``BACKFILL`` (the backfill side)."""
    first = markers.get((event.topic, event.partition))
    if meter_applies(meter.activation_topic, event.topic, first, event.offset):
        return STREAM
    return BACKFILL


def _envelope(event: LedgerEvent, properties: dict[str, Any]) -> EnvelopeEvent:
    return EnvelopeEvent(event.id, event.type, event.customer, event.time_ms, properties)


class WorkerMatching:
    """Implements ``billing.corrections.Matching`` with the worker's own code."""

    def __init__(self) -> None:
        self._compiled: dict[str, CompiledMeter] = {}

    def _meter(self, meter: Meter) -> CompiledMeter:
        cm = self._compiled.get(meter.id)
        if cm is None or cm.meter != meter:
            cm = self._compiled[meter.id] = CompiledMeter(meter)
        return cm

    def contributions(
        self,
        meters: Sequence[Meter],
        event: LedgerEvent,
        properties: dict[str, Any],
        markers: dict[str, Markers],
    ) -> list[Contribution]:
        ev = _envelope(event, properties)
        out = []
        for meter in meters:
            try:
                c = self._meter(meter).match(ev)
            except ValueProblem:
                continue
            if c is not None:
                side = side_of(meter, event, markers.get(meter.id, {}))
                out.append(
                    Contribution(meter, side, c.group_key, dict(c.group_values), c.value, c.uniq)
                )
        return out

    def windows(
        self,
        meter: Meter,
        events: Sequence[tuple[LedgerEvent, dict[str, Any] | None]],
        markers: Markers,
    ) -> dict[tuple[str, int, str, str], WindowAggregate]:
        compiled = self._meter(meter)
        latest = meter.aggregation == Aggregation.LATEST
        states: dict[tuple[str, int, str, str], tuple[dict[str, str], MinuteAggregate]] = {}
        for event, properties in events:
            if properties is None:
                continue  # voided
            try:
                c = compiled.match(_envelope(event, properties))
            except ValueProblem:
                continue
            if c is None:
                continue
            key = (
                event.customer,
                event.time_ms - event.time_ms % MINUTE_MS,
                side_of(meter, event, markers),
                c.group_key,
            )
            if key not in states:
                states[key] = (dict(c.group_values), MinuteAggregate())
            states[key][1].add(c.value, c.uniq, (event.time_ms, event.id) if latest else None)
        return {
            key: WindowAggregate(
                group_values=gv,
                events=st.events,
                value_count=st.value_count,
                value_sum=st.value_sum,
                value_min=st.value_min,
                value_max=st.value_max,
                uniq=tuple(sorted(st.uniq)),
                latest=st.latest if st.latest is not None else NO_LATEST,
            )
            for key, (gv, st) in states.items()
        }
