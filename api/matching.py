"""The worker's meter matching (``streams.matching``) applied to one stored event, for event
corrections (``billing.corrections`` takes this function; billing itself does not import the
stream code)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from billing.corrections import Contribution
from schemas.envelope import EnvelopeEvent
from schemas.meters import Meter
from schemas.timeutil import epoch_ms
from streams.matching import CompiledMeter, ValueProblem


def contributions(
    meters: list[Meter], event: dict[str, Any], properties: dict[str, Any]
) -> list[Contribution]:
    """What ``event`` (a row of the ledger, with ``properties``) adds to each meter when the meter
    counts it (by the same matching rules as the worker)."""
    ev = EnvelopeEvent(
        id=str(event["id"]),
        type=str(event["type"]),
        customer=str(event["customer"]),
        time_ms=epoch_ms(event["time"]),
        properties=properties,
    )
    out = []
    for meter in meters:
        try:
            c = CompiledMeter(meter).match(ev)
        except ValueProblem:
            continue
        if c is not None:
            value = c.value if c.value is not None else None
            out.append(Contribution(meter, c.group_key, dict(c.group_values), value))
    return out


__all__ = ["Decimal", "contributions"]
