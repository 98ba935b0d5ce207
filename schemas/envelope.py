"""Envelopes: many events in one Kafka message (15-20x the worker throughput of one per message).

Partitioning: an event goes to partition ``crc32(tenant \\0 id) % partitions``. Every copy of an
event id (retries, duplicates) therefore lands in the same partition, which makes dedupe by
(tenant, id) exact with partition-local state, and spreads a large customer across partitions.
The API groups a request's events by target partition and produces one envelope per group
(split at ``max_events``); the Kafka message key is the tenant id.

Wire format (orjson)::

    {"v": 1, "t": tenant_id, "at": ingested_at_epoch_ms,
     "e": [[id, type, customer, time_epoch_ms, properties], ...]}

``decode`` checks what the worker needs to store an event (the same rules the API applies, plus
the store's time range): a message that is not an envelope raises ``EnvelopeError`` with a
``reason`` (``schemas.deadletters``); a bad event inside a good envelope does not spoil its
neighbours: it is left out of ``events`` and listed in ``rejected`` (its index, the raw row and
the problem), and ``positions`` then gives each kept event's index in the envelope. The worker
turns both into dead letters.
"""

from __future__ import annotations

import operator
import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.events import ID_MAX, Event
from schemas.jsonpath import json_kind
from schemas.timeutil import epoch_ms, from_epoch_ms

VERSION = 1
TENANT_MAX = 64
# The store's DateTime64(3) range: 1900-01-01T00:00:00.000Z .. 2299-12-31T23:59:59.999Z.
STORE_MS_MIN = -2_208_988_800_000
STORE_MS_MAX = 10_413_791_999_999


def partition_for(tenant_id: str, event_id: str, partitions: int) -> int:
    return zlib.crc32(f"{tenant_id}\x00{event_id}".encode()) % partitions


@dataclass(frozen=True, slots=True)
class EnvelopeEvent:
    """An event as the worker sees it (time as epoch ms for speed)."""

    id: str
    type: str
    customer: str
    time_ms: int
    properties: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RejectedEvent:
    """An event of a decodable envelope that the worker cannot store (a dead letter)."""

    index: int  # its position in the envelope
    row: Any  # the raw JSON value of the row
    problem: str


@dataclass(frozen=True, slots=True)
class Envelope:
    tenant_id: str
    ingested_at_ms: int
    events: list[EnvelopeEvent]
    # events left out (bad rows); ``positions`` maps each kept event to its index in the
    # envelope when any was left out (None: ``events[i]`` is row ``i``)
    rejected: tuple[RejectedEvent, ...] = ()
    positions: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class OutgoingEnvelope:
    partition: int
    payload: bytes
    event_ids: tuple[str, ...]


# One event on the wire: [id, type, customer, time_epoch_ms, properties].
Row = tuple[str, str, str, int, dict[str, Any]]


def encode(tenant_id: str, ingested_at_ms: int, events: list[Event]) -> bytes:
    return _payload(tenant_id, ingested_at_ms, [to_row(e) for e in events])


def to_row(event: Event) -> Row:
    return (event.id, event.type, event.customer, epoch_ms(event.time), event.properties)


_ID = operator.itemgetter(0)  # a wire row's event id


def _payload(tenant_id: str, ingested_at_ms: int, rows: list[Row]) -> bytes:
    return orjson.dumps({"v": VERSION, "t": tenant_id, "at": ingested_at_ms, "e": rows})


def group_rows(
    tenant_id: str,
    ingested_at_ms: int,
    rows: list[Row],
    partitions: int,
    max_events: int = 1000,
) -> list[OutgoingEnvelope]:
    """Group wire rows by target partition into envelopes of at most ``max_events`` events.

    The ingest hot path calls this directly with rows it validated itself (no pydantic model per
    event). Envelopes come in ascending partition order; order within a partition is preserved;
    every input row is in exactly one envelope.
    """
    by_partition: dict[int, list[Row]] = {}
    if partitions == 1:  # `tally run`'s topic: all in partition 0, no hash per event
        if rows:
            by_partition[0] = rows
    else:
        prefix = f"{tenant_id}\x00"
        crc = zlib.crc32
        for row in rows:
            part = crc((prefix + row[0]).encode()) % partitions  # == partition_for(tenant, id)
            bucket = by_partition.get(part)
            if bucket is None:
                by_partition[part] = [row]
            else:
                bucket.append(row)
    out: list[OutgoingEnvelope] = []
    for part in sorted(by_partition):
        evs = by_partition[part]
        for i in range(0, len(evs), max_events):
            chunk = evs[i : i + max_events]
            out.append(
                OutgoingEnvelope(
                    part, _payload(tenant_id, ingested_at_ms, chunk), tuple(map(_ID, chunk))
                )
            )
    return out


def group(
    tenant_id: str,
    ingested_at_ms: int,
    events: list[Event],
    partitions: int,
    max_events: int = 1000,
) -> list[OutgoingEnvelope]:
    """``group_rows`` for validated ``Event`` models."""
    return group_rows(
        tenant_id, ingested_at_ms, [to_row(e) for e in events], partitions, max_events
    )


class EnvelopeError(ValueError):
    """A message on the topic is not a valid envelope (poison message).

    ``reason`` says why (``schemas.deadletters``: ``undecodable``, ``unsupported_version``,
    ``invalid_envelope``); ``tenant_id`` is the envelope's tenant when it could be read ('')."""

    def __init__(self, message: str, reason: str = "undecodable", tenant_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.tenant_id = tenant_id


def _text_problem(name: str, v: Any) -> str | None:
    if type(v) is not str:
        return f"{name} must be a string, got {json_kind(v)}"
    if not v:
        return f"{name} must not be empty"
    if len(v) > ID_MAX:
        return f"{name} is longer than {ID_MAX} characters"
    return None


def event_problem(row: Any) -> str | None:
    """Why a wire row cannot be stored as an event, or None when it can."""
    if type(row) is not list or len(row) != 5:
        return "an event row must be an array [id, type, customer, time_ms, properties]"
    for name, v in zip(("id", "type", "customer"), row, strict=False):
        problem = _text_problem(name, v)
        if problem is not None:
            return problem
    t = row[3]
    if type(t) is not int:
        return f"time must be integer epoch milliseconds, got {json_kind(t)}"
    if not STORE_MS_MIN <= t <= STORE_MS_MAX:
        return "time is outside the store's range (years 1900..2299)"
    if type(row[4]) is not dict:
        return f"properties must be an object, got {json_kind(row[4])}"
    return None


def _header(payload: bytes) -> tuple[str, int, list[Any]]:
    """``(tenant, ingested_at_ms, rows)`` of an envelope; ``EnvelopeError`` (with its dead-letter
    reason and the tenant when readable) when the message is not one."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"undecodable envelope: {exc}") from None
    if type(doc) is not dict:
        raise EnvelopeError(f"an envelope is a JSON object, got {json_kind(doc)}")
    tenant = doc.get("t")
    hint = tenant if type(tenant) is str and 0 < len(tenant) <= TENANT_MAX else ""
    version = doc.get("v")
    if type(version) is not int or version != VERSION:
        raise EnvelopeError(
            f"unsupported envelope version {version!r} (this worker reads version {VERSION})",
            "unsupported_version",
            hint,
        )
    if not hint:
        raise EnvelopeError(
            f"envelope field t (tenant) must be a string of 1..{TENANT_MAX} characters",
            "invalid_envelope",
        )
    at = doc.get("at")
    if type(at) is not int or not STORE_MS_MIN <= at <= STORE_MS_MAX:
        raise EnvelopeError(
            "envelope field at (ingested at) must be integer epoch milliseconds in the store's "
            "range (years 1900..2299)",
            "invalid_envelope",
            hint,
        )
    rows = doc.get("e")
    if type(rows) is not list:
        raise EnvelopeError("envelope field e (events) must be an array", "invalid_envelope", hint)
    return hint, at, rows


def _row_ok(row: Any) -> bool:
    """A well-formed event row (what ``event_problem`` accepts), checked inline."""
    if type(row) is not list or len(row) != 5:
        return False
    ev_id, ev_type, customer, t, props = row
    return (
        type(ev_id) is str
        and type(ev_type) is str
        and type(customer) is str
        and type(t) is int
        and type(props) is dict
        and 0 < len(ev_id) <= ID_MAX
        and 0 < len(ev_type) <= ID_MAX
        and 0 < len(customer) <= ID_MAX
        and STORE_MS_MIN <= t <= STORE_MS_MAX
    )


def _split(rows: list[Any]) -> tuple[list[Any], list[RejectedEvent], list[int]]:
    """Good rows, the rejected ones (with their problem) and the good rows' positions."""
    good: list[Any] = []
    rejected: list[RejectedEvent] = []
    positions: list[int] = []
    for i, row in enumerate(rows):
        if _row_ok(row):
            good.append(row)
            positions.append(i)
        else:
            rejected.append(RejectedEvent(i, row, event_problem(row) or "invalid event row"))
    return good, rejected, positions


def decode(payload: bytes) -> Envelope:
    """Decode an envelope. Raises ``EnvelopeError`` when the message is not one; bad events of a
    good envelope are left out and listed in ``Envelope.rejected``."""
    hint, at, rows = _header(payload)
    good, rejected, positions = _split(rows)
    events = [EnvelopeEvent(*row) for row in good]
    if not rejected:
        return Envelope(hint, at, events)
    return Envelope(hint, at, events, tuple(rejected), tuple(positions))


def envelope_of_row(tenant_id: str, ingested_at_ms: int, row: Any) -> bytes:
    """A one-event envelope holding ``row`` as it was (a dead letter's payload)."""
    return orjson.dumps({"v": VERSION, "t": tenant_id, "at": ingested_at_ms, "e": [row]})


@dataclass(frozen=True, slots=True)
class EnvelopeColumns:
    """A v1 envelope decoded into columns (the worker's hot path: no object per event).

    ``ids[i]``, ``types[i]``, ``customers[i]``, ``times_ms[i]``, ``properties[i]`` are kept event
    ``i``; its index in the envelope is ``i``, or ``positions[i]`` when bad rows were left out
    (listed in ``rejected``, as in ``Envelope``).
    """

    tenant_id: str
    ingested_at_ms: int
    ids: list[str]
    types: list[str]
    customers: list[str]
    times_ms: list[int]
    properties: list[dict[str, Any]]
    rejected: tuple[RejectedEvent, ...] = ()
    positions: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def event(self, i: int) -> EnvelopeEvent:
        return EnvelopeEvent(
            self.ids[i], self.types[i], self.customers[i], self.times_ms[i], self.properties[i]
        )


def _texts_ok(col: Any) -> bool:
    """Every value a string of 1..ID_MAX characters (the loops run in C: ``map`` of builtins)."""
    if not col:
        return True
    return set(map(type, col)) == {str} and min(map(len, col)) > 0 and max(map(len, col)) <= ID_MAX


def _columns_ok(ids: Any, types: Any, customers: Any, times: Any, props: Any) -> bool:
    """Every row well-formed, checked a column at a time (same rules as ``_row_ok``)."""
    return (
        _texts_ok(ids)
        and _texts_ok(types)
        and _texts_ok(customers)
        and (not times or set(map(type, times)) == {int})
        and (not times or (STORE_MS_MIN <= min(times) and max(times) <= STORE_MS_MAX))
        and (not props or set(map(type, props)) == {dict})
    )


def decode_columns(payload: bytes) -> EnvelopeColumns:
    """Decode a v1 envelope into columns: the same acceptance, errors and rejected rows as
    ``decode`` (checked by a property test), without an object per event. (The thousands of
    small containers it makes are why the processes raise the collector's threshold:
    ``tally.gcpause.tune_gc``.)
    """
    hint, at, rows = _header(payload)
    if not rows:
        return EnvelopeColumns(hint, at, [], [], [], [], [])
    rejected: list[RejectedEvent] = []
    positions: list[int] = []
    if set(map(type, rows)) == {list} and set(map(len, rows)) == {5}:
        cols = list(zip(*rows, strict=True))
        if not _columns_ok(*cols):
            cols = []
    else:
        cols = []
    if not cols:  # some row is bad: split row by row, like ``decode``
        good, rejected, positions = _split(rows)
        cols = list(zip(*good, strict=True)) if good else [(), (), (), (), ()]
    ids, types, customers, times, props = cols
    return EnvelopeColumns(
        hint,
        at,
        list(ids),
        list(types),
        list(customers),
        list(times),
        list(props),
        tuple(rejected),
        tuple(positions) if rejected else None,
    )


__all__ = [
    "Envelope",
    "EnvelopeColumns",
    "EnvelopeError",
    "EnvelopeEvent",
    "OutgoingEnvelope",
    "RejectedEvent",
    "Row",
    "decode",
    "decode_columns",
    "encode",
    "envelope_of_row",
    "event_problem",
    "from_epoch_ms",
    "group",
    "group_rows",
    "partition_for",
]
