"""The worker's dead letters (pure): what a bad message or event becomes (``schemas.deadletters``).

The processor calls these at four points, and only these (docs/architecture.md, "Dead letters"):

- ``BatchProcessor.add``: a message that is not an envelope or control message ->
  ``of_message`` (kept on its ``Entry``);
- ``BatchProcessor.prepare``: per link, ``of_rejected`` for the bad events of good envelopes,
  ``of_meter_value`` / ``of_unencodable`` found while computing the rows, then ``link_rows``;
- ``BatchProcessor.flush_batch`` step (b): the link's rows go to ``Sink.record_dead_letters``
  before its usage commit (idempotent: deterministic rows keyed by source position);
- ``BatchProcessor.apply``: a stored link's dead letters are counted
  (``tally_worker_dead_letters{reason}``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol

from schemas.control import ControlError
from schemas.deadletters import (
    EMPTY_MESSAGE,
    INVALID_EVENT,
    METER_VALUE,
    DeadLetter,
    DeadLetterRow,
    row,
)
from schemas.envelope import (
    Envelope,
    EnvelopeColumns,
    EnvelopeError,
    EnvelopeEvent,
    envelope_of_row,
)


class Origin(Protocol):
    """Where an event came from: its envelope's tenant and ingestion time."""

    @property
    def tenant_id(self) -> str: ...

    @property
    def ingested_at_ms(self) -> int: ...


def of_message(payload: bytes | None, exc: EnvelopeError | ControlError | None) -> DeadLetter:
    """A whole message the worker cannot read (``exc`` None: the message has no value)."""
    if payload is None or exc is None:
        return DeadLetter(EMPTY_MESSAGE, "the message has no value", payload or b"")
    return DeadLetter(exc.reason, str(exc), payload, tenant_id=exc.tenant_id)


def _encode_row(tenant_id: str, ingested_at_ms: int, raw: Any) -> bytes:
    """A one-event envelope of ``raw``; the stdlib encoder when orjson's nesting limit (254
    levels) is exceeded; empty when nothing can encode it (it is then not re-drivable)."""
    try:
        return envelope_of_row(tenant_id, ingested_at_ms, raw)
    except (TypeError, ValueError):
        pass
    try:
        doc = {"v": 1, "t": tenant_id, "at": ingested_at_ms, "e": [raw]}
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    except (TypeError, ValueError, RecursionError):
        return b""


def _event_id(raw: Any) -> str:
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        return raw[0][:256]
    return ""


def of_rejected(env: Envelope | EnvelopeColumns) -> list[DeadLetter]:
    """The bad events of a decodable envelope (``Envelope.rejected``)."""
    return [
        DeadLetter(
            INVALID_EVENT,
            f"event {r.index} of the envelope: {r.problem}",
            _encode_row(env.tenant_id, env.ingested_at_ms, r.row),
            tenant_id=env.tenant_id,
            index=r.index,
            event_id=_event_id(r.row),
        )
        for r in env.rejected
    ]


def _wire(ev: EnvelopeEvent) -> list[Any]:
    return [ev.id, ev.type, ev.customer, ev.time_ms, ev.properties]


def of_unencodable(env: Origin, index: int, ev: EnvelopeEvent, exc: Exception) -> DeadLetter:
    """An event whose properties the ledger cannot store as JSON (nested too deeply)."""
    return DeadLetter(
        INVALID_EVENT,
        f"event {index} of the envelope: properties cannot be stored as JSON ({exc}); "
        "at most 254 levels of nesting",
        _encode_row(env.tenant_id, env.ingested_at_ms, _wire(ev)),
        tenant_id=env.tenant_id,
        index=index,
        event_id=ev.id,
    )


def of_meter_value(
    env: Origin, index: int, ev: EnvelopeEvent, meter_id: str, exc: Exception | str
) -> DeadLetter:
    """An event stored in the ledger that meter ``meter_id`` could not count (informational)."""
    return DeadLetter(
        METER_VALUE,
        f"meter {meter_id}: {exc}; the event is stored but does not count for this meter",
        _encode_row(env.tenant_id, env.ingested_at_ms, _wire(ev)),
        tenant_id=env.tenant_id,
        index=index,
        event_id=ev.id,
        meter_id=meter_id,
    )


def link_rows(
    topic: str,
    partition: int,
    found: Iterable[tuple[int, int | None, DeadLetter]],
    max_payload_bytes: int,
) -> list[DeadLetterRow]:
    """The table rows of one link's dead letters: ``found`` = (offset, produced_at_ms, letter).
    One row per source position (the first wins when a position repeats)."""
    out: dict[tuple[int, int, str], DeadLetterRow] = {}
    for offset, produced_at_ms, dl in found:
        key = (offset, dl.index, dl.meter_id)
        if key not in out:
            out[key] = row(dl, topic, partition, offset, produced_at_ms, max_payload_bytes)
    return [out[k] for k in sorted(out)]


__all__ = ["link_rows", "of_message", "of_meter_value", "of_rejected", "of_unencodable"]
