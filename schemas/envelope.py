"""Envelopes: many events in one Kafka message (15-20x the worker throughput of one per message).

Partitioning: an event goes to partition ``crc32(tenant \\0 id) % partitions``. Every copy of an
event id (retries, duplicates) therefore lands in the same partition, which makes dedupe by
(tenant, id) exact with partition-local state, and spreads a large customer across partitions.
The API groups a request's events by target partition and produces one envelope per group
(split at ``max_events``); the Kafka message key is the tenant id.

Wire format, version 2 (written since 2026-12-03; orjson, compact)::

    {"v": 2, "t": tenant_id, "at": ingested_at_epoch_ms,
     "i": [id, ...], "y": [type, ...], "c": [customer, ...], "m": [time_epoch_ms, ...]}
    <properties of event 0 as one JSON object>
    <properties of event 1>
    ...

a header line holding the events as columns, then one line per event with its properties
(the lines are separated by a newline byte, which compact JSON never holds raw; none follows
the last line; no lines after the header when there are no events). The worker stores each
property line as the ledger's ``properties`` text as it is, and parses all lines in one call
for its meters: it no longer writes every event's properties back to JSON, and it reads the
columns without making a row per event. Version 1 (one JSON document, an event per row) is
still read, so a topic may hold both while APIs and workers are upgraded (workers first: a
worker that reads only version 1 sends version 2 messages to the dead letters as
``unsupported_version``)::

    {"v": 1, "t": tenant_id, "at": ingested_at_epoch_ms,
     "e": [[id, type, customer, time_epoch_ms, properties], ...]}

The writers of the topic are trusted (an envelope names its tenant): the worker checks that the
property lines parse as one JSON value each and that every column has one value per event, not
that a line on its own is the object parsed for it when a writer splits objects across lines.

``decode`` checks what the worker needs to store an event (the same rules the API applies, plus
the store's time range): a message that is not an envelope raises ``EnvelopeError`` with a
``reason`` (``schemas.deadletters``); a bad event inside a good envelope does not spoil its
neighbours: it is left out of ``events`` and listed in ``rejected`` (its index, the raw row and
the problem), and ``positions`` then gives each kept event's index in the envelope. The worker
turns both into dead letters.
"""

from __future__ import annotations

import itertools
import operator
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from schemas.events import ID_MAX, Event
from schemas.jsonpath import json_kind
from schemas.timeutil import epoch_ms, from_epoch_ms

VERSION = 2  # what this code writes
READ_VERSIONS = (1, 2)  # what it reads
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

_FIELD = [operator.itemgetter(j) for j in range(5)]


@dataclass(frozen=True, slots=True)
class EventColumns:
    """Validated events as parallel columns, in request order: what the ingest API delivers
    (its one-call decoder builds them without a tuple per event) and what an envelope's header
    holds. Event ``i`` is ``ids[i]``, ``types[i]``, ``customers[i]``, ``times_ms[i]`` (epoch
    milliseconds), ``properties[i]`` (an object)."""

    ids: list[str]
    types: list[str]
    customers: list[str]
    times_ms: list[int]
    properties: list[dict[str, Any]]

    @classmethod
    def of_rows(cls, rows: Sequence[Row]) -> EventColumns:
        # a column at a time (``map`` of ``itemgetter``: 0.4x the time of ``zip(*rows)``, which
        # makes an iterator per row)
        ids, types, customers, times, props = (list(map(_FIELD[j], rows)) for j in range(5))
        return cls(ids, types, customers, times, props)

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, i: int) -> Row:
        return (self.ids[i], self.types[i], self.customers[i], self.times_ms[i], self.properties[i])

    def rows(self) -> list[Row]:
        cols = (self.ids, self.types, self.customers, self.times_ms, self.properties)
        return list(zip(*cols, strict=True))

    def take(self, positions: Sequence[int]) -> EventColumns:
        """The events at ``positions``, in that order."""
        return EventColumns(
            [self.ids[i] for i in positions],
            [self.types[i] for i in positions],
            [self.customers[i] for i in positions],
            [self.times_ms[i] for i in positions],
            [self.properties[i] for i in positions],
        )

    def slice(self, start: int, stop: int) -> EventColumns:
        return EventColumns(
            self.ids[start:stop],
            self.types[start:stop],
            self.customers[start:stop],
            self.times_ms[start:stop],
            self.properties[start:stop],
        )


def encode(tenant_id: str, ingested_at_ms: int, events: list[Event]) -> bytes:
    cols = EventColumns.of_rows([to_row(e) for e in events])
    return _encoded(tenant_id, ingested_at_ms, cols)[0]


def to_row(event: Event) -> Row:
    return (event.id, event.type, event.customer, epoch_ms(event.time), event.properties)


# Separates the events' properties in one bulk ``orjson.dumps`` (``json_texts``). A raw ``"``
# in orjson's output only opens or closes a string, so this byte sequence appears where we put
# it or, only if some property holds exactly this string as a list element, somewhere else too:
# then there is a piece too many and the slow path runs. It is short and nothing in it is
# escaped in JSON (DEL is not a control character there), which keeps the bulk call and the
# search for it fast (about half the time of the 24-character separator with control
# characters used before, measured).
_SEP = "\x7f"
_SEP_BYTES = b"," + orjson.dumps(_SEP) + b","

# version 1 held an event's properties under three levels (envelope, event list, row)
_NESTED = 3


def _nested_dumps(obj: Any) -> bytes:
    """``orjson.dumps(obj)`` inside two more brackets, so that orjson refuses properties
    (``orjson.JSONEncodeError``) at the nesting depth at which it refused them in a version 1
    envelope. The ingest API's limit on properties' nesting (``api.ingest.MAX_NESTING``) is where
    this encoder stops."""
    return orjson.dumps([[obj]])


def json_texts(objs: Sequence[Any]) -> list[bytes]:
    """``[orjson.dumps(o) for o in objs]``, computed with ONE ``dumps`` of all of them (a call of
    orjson costs ~2 us whatever the size of the object; the bulk call ~50 ns per object).
    ``orjson.JSONEncodeError`` as ``dumps`` raises it, at the nesting depth version 1 did
    (``_nested_dumps``)."""
    if not objs:
        return []
    interleaved = list(itertools.chain.from_iterable(zip(objs, itertools.repeat(_SEP))))
    interleaved.pop()
    texts = _nested_dumps(interleaved).split(_SEP_BYTES)
    if len(texts) != len(objs):  # the separator inside a property: one by one
        return [_nested_dumps([o])[_NESTED:-_NESTED] for o in objs]
    texts[0] = texts[0][_NESTED:]
    texts[-1] = texts[-1][:-_NESTED]
    return texts


def _encoded(
    tenant_id: str, ingested_at_ms: int, events: EventColumns
) -> tuple[bytes, tuple[str, ...]]:
    """A version 2 envelope of ``events``, and their event ids (no property lines when there are
    no events: the header alone)."""
    head = orjson.dumps(
        {
            "v": VERSION,
            "t": tenant_id,
            "at": ingested_at_ms,
            "i": events.ids,
            "y": events.types,
            "c": events.customers,
            "m": events.times_ms,
        }
    )
    return b"\n".join([head, *json_texts(events.properties)]), tuple(events.ids)


def payload_v1(tenant_id: str, ingested_at_ms: int, rows: Sequence[Any]) -> bytes:
    """A version 1 envelope of ``rows`` (dead letters' one-event payloads; tests of reading
    version 1)."""
    return orjson.dumps({"v": 1, "t": tenant_id, "at": ingested_at_ms, "e": rows})


def group_rows(
    tenant_id: str,
    ingested_at_ms: int,
    rows: list[Row],
    partitions: int,
    max_events: int = 1000,
) -> list[OutgoingEnvelope]:
    """``group_columns`` of wire rows."""
    return group_columns(
        tenant_id, ingested_at_ms, EventColumns.of_rows(rows), partitions, max_events
    )


def group_columns(
    tenant_id: str,
    ingested_at_ms: int,
    events: EventColumns,
    partitions: int,
    max_events: int = 1000,
) -> list[OutgoingEnvelope]:
    """Group events by target partition into envelopes of at most ``max_events`` events.

    The ingest hot path calls this directly with the events it validated itself (no pydantic
    model per event). Envelopes come in ascending partition order; order within a partition is
    preserved; every input event is in exactly one envelope.
    """
    n = len(events)
    parts: list[tuple[int, EventColumns]] = []
    if partitions == 1:  # `tally run`'s topic: all in partition 0, no hash per event
        if n:
            parts.append((0, events))
    else:
        prefix = f"{tenant_id}\x00"
        crc = zlib.crc32
        by_partition: dict[int, list[int]] = {}
        for i, ev_id in enumerate(events.ids):
            part = crc((prefix + ev_id).encode()) % partitions  # == partition_for(tenant, id)
            bucket = by_partition.get(part)
            if bucket is None:
                by_partition[part] = [i]
            else:
                bucket.append(i)
        parts = [(part, events.take(by_partition[part])) for part in sorted(by_partition)]
    out: list[OutgoingEnvelope] = []
    for part, evs in parts:
        size = len(evs)
        for i in range(0, size, max_events):
            chunk = evs if size <= max_events else evs.slice(i, i + max_events)
            payload, ids = _encoded(tenant_id, ingested_at_ms, chunk)
            out.append(OutgoingEnvelope(part, payload, ids))
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


class _Opened(NamedTuple):
    """An envelope's header checked; its events as version 1 rows or version 2 columns."""

    tenant_id: str
    ingested_at_ms: int
    rows: list[Any] | None  # version 1: the event rows as they are
    columns: list[list[Any]] | None  # version 2: ids, types, customers, times, properties
    texts: list[bytes] | None  # version 2: the property lines


def _properties(texts: list[bytes]) -> list[Any]:
    """The JSON value of each property line, all parsed in one call; a line that is not one JSON
    value stays as its text (its event is then rejected: properties must be an object)."""
    if not texts:
        return []
    try:
        values = orjson.loads(b"[%b]" % b",".join(texts))
        if type(values) is list and len(values) == len(texts):
            return values
    except orjson.JSONDecodeError:
        pass
    out: list[Any] = []
    for text in texts:
        try:
            out.append(orjson.loads(text))
        except orjson.JSONDecodeError:
            out.append(text.decode("utf-8", "replace"))
    return out


def _open(payload: bytes) -> _Opened:
    """The header of an envelope of either version and its events; ``EnvelopeError`` (with its
    dead-letter reason and the tenant when readable) when the message is not one."""
    nl = payload.find(b"\n")
    try:
        doc = orjson.loads(payload if nl < 0 else payload[:nl])
    except orjson.JSONDecodeError as exc:
        if nl < 0:
            raise EnvelopeError(f"undecodable envelope: {exc}") from None
        doc, nl = None, -1  # not a header line: perhaps a version 1 document over several lines
    whole = doc is None or (nl >= 0 and type(doc) is dict and doc.get("v") == 1)
    if whole:
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise EnvelopeError(f"undecodable envelope: {exc}") from None
        nl = -1
    if type(doc) is not dict:
        raise EnvelopeError(f"an envelope is a JSON object, got {json_kind(doc)}")
    tenant = doc.get("t")
    hint = tenant if type(tenant) is str and 0 < len(tenant) <= TENANT_MAX else ""
    version = doc.get("v")
    if type(version) is not int or version not in READ_VERSIONS:
        raise EnvelopeError(
            f"unsupported envelope version {version!r} (this worker reads versions "
            f"{', '.join(map(str, READ_VERSIONS))})",
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
    if whole and version != 1:
        raise EnvelopeError(
            "a version 2 envelope's header is its first line", "invalid_envelope", hint
        )
    if version == 1:
        rows = doc.get("e")
        if type(rows) is not list:
            raise EnvelopeError(
                "envelope field e (events) must be an array", "invalid_envelope", hint
            )
        return _Opened(hint, at, rows, None, None)
    columns: list[Any] = [doc.get("i"), doc.get("y"), doc.get("c"), doc.get("m")]
    if any(type(c) is not list for c in columns):
        raise EnvelopeError(
            "envelope fields i, y, c and m (event ids, types, customers, times) must be arrays",
            "invalid_envelope",
            hint,
        )
    texts = [] if nl < 0 else payload[nl + 1 :].split(b"\n")
    sizes = [len(c) for c in columns] + [len(texts)]
    if len(set(sizes)) != 1:
        raise EnvelopeError(
            "envelope fields i, y, c, m and the property lines must hold one value per event, "
            f"got {', '.join(map(str, sizes))}",
            "invalid_envelope",
            hint,
        )
    columns.append(_properties(texts))
    return _Opened(hint, at, None, columns, texts)


def _rows_of(columns: list[list[Any]]) -> list[Any]:
    """Version 2 columns as version 1 rows (``[id, type, customer, time, properties]``)."""
    return list(map(list, zip(*columns, strict=True)))


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
    """Decode an envelope (either version). Raises ``EnvelopeError`` when the message is not one;
    bad events of a good envelope are left out and listed in ``Envelope.rejected`` (a version 2
    event there as its version 1 row)."""
    opened = _open(payload)
    rows = opened.rows if opened.columns is None else _rows_of(opened.columns)
    assert rows is not None
    hint, at = opened.tenant_id, opened.ingested_at_ms
    good, rejected, positions = _split(rows)
    events = [EnvelopeEvent(*row) for row in good]
    if not rejected:
        return Envelope(hint, at, events)
    return Envelope(hint, at, events, tuple(rejected), tuple(positions))


def envelope_of_row(tenant_id: str, ingested_at_ms: int, row: Any) -> bytes:
    """A one-event envelope (version 1) holding ``row`` as it was (a dead letter's payload)."""
    return payload_v1(tenant_id, ingested_at_ms, [row])


@dataclass(frozen=True, slots=True)
class EnvelopeColumns:
    """An envelope decoded into columns (the worker's hot path: no object per event).

    ``ids[i]``, ``types[i]``, ``customers[i]``, ``times_ms[i]``, ``properties[i]`` are kept event
    ``i``; its index in the envelope is ``i``, or ``positions[i]`` when bad rows were left out
    (listed in ``rejected``, as in ``Envelope``). ``property_texts[i]`` (version 2) is its
    property line, the JSON text of ``properties[i]``; None for a version 1 envelope.
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
    property_texts: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def event(self, i: int) -> EnvelopeEvent:
        return EnvelopeEvent(
            self.ids[i], self.types[i], self.customers[i], self.times_ms[i], self.properties[i]
        )


def _texts_ok(col: Any, repeats: bool = False) -> bool:
    """Every value a string of 1..ID_MAX characters, the loops in C: ``str.join`` raises for a
    value that is not a string, then the lengths. ``repeats``: the column holds few distinct
    values (event types, customers), so only the distinct ones are checked (a ``set`` also
    raises for a list or an object)."""
    if not col:
        return True
    try:
        values = set(col) if repeats else col
        "".join(values)
    except TypeError:
        return False
    lengths = list(map(len, values))
    return min(lengths) > 0 and max(lengths) <= ID_MAX


def _columns_ok(ids: Any, types: Any, customers: Any, times: Any, props: Any) -> bool:
    """Every row well-formed, checked a column at a time (same rules as ``_row_ok``)."""
    return (
        _texts_ok(ids)
        and _texts_ok(types, repeats=True)
        and _texts_ok(customers, repeats=True)
        and (not times or set(map(type, times)) == {int})
        and (not times or (STORE_MS_MIN <= min(times) and max(times) <= STORE_MS_MAX))
        and (not props or set(map(type, props)) == {dict})
    )


def decode_columns(payload: bytes) -> EnvelopeColumns:
    """Decode an envelope (either version) into columns: the same acceptance, errors and
    rejected rows as ``decode`` (checked by a property test), without an object per event. (The
    thousands of small containers it makes are why the processes raise the collector's
    threshold: ``tally.gcpause.tune_gc``.)
    """
    hint, at, rows, cols, texts = _open(payload)
    if cols is None:  # version 1: rows
        assert rows is not None
        if not rows:
            return EnvelopeColumns(hint, at, [], [], [], [], [])
        cols = []
        if set(map(type, rows)) == {list} and set(map(len, rows)) == {5}:
            cols = list(map(list, zip(*rows, strict=True)))
            if not _columns_ok(*cols):
                cols = []
        if not cols:
            return _rejecting(hint, at, rows, None)
    elif cols[0] and not _columns_ok(*cols):
        return _rejecting(hint, at, _rows_of(cols), texts)
    ids, types, customers, times, props = cols
    return EnvelopeColumns(hint, at, ids, types, customers, times, props, property_texts=texts)


def _rejecting(hint: str, at: int, rows: list[Any], texts: list[bytes] | None) -> EnvelopeColumns:
    """Columns of an envelope with some bad row: split row by row, like ``decode``."""
    good, rejected, positions = _split(rows)
    ids, types, customers, times, props = (
        map(list, zip(*good, strict=True)) if good else ([], [], [], [], [])
    )
    return EnvelopeColumns(
        hint,
        at,
        ids,
        types,
        customers,
        times,
        props,
        tuple(rejected),
        tuple(positions) if rejected else None,
        None if texts is None else [texts[i] for i in positions],
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
    "json_texts",
    "partition_for",
    "payload_v1",
]
