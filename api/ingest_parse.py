"""Pure parsing and validation of ingest request bodies (native and CloudEvents). No I/O.

The hot path avoids pydantic's per-field validation: a body is decoded once with orjson (the
cyclic garbage collector paused meanwhile: decoding builds thousands of containers that it would
otherwise walk several times), each event is checked by hand (the same rules as
``schemas.events.Event``) and the valid ones become ``Row`` tuples ``(id, type, customer, time_ms,
properties)`` -- exactly an envelope entry (``schemas.envelope``, wire format v1).
``row_to_event`` gives the pydantic ``Event`` when one is needed. Every problem is reported as
``{index, field, message}``.

A native body, or a batch of CloudEvents, goes first through ``parse_native_body`` /
``parse_cloudevents_body``: one msgspec call decodes the array and checks every event's shape in
C (required strings and their lengths, no unknown field, ``properties`` an object or null,
``time`` a string, integer or null) into small structs; the times are read all at once when
they share one form (``api.ingest_times.bulk_time_ms``), else one by one, and the events come
out as columns (``schemas.envelope.EventColumns``, what ``api.ingest.deliver`` takes), without a
tuple per event. It accepts only the case where every event is valid; anything else (one bad
event, a single object, a float time) returns None and the body goes through the paths below,
which word every problem, so answers and errors are the same either way
(``tests/unit/api/test_ingest_parse.py`` compares them). The properties it decodes are the values orjson decodes, except integers beyond 64 bits
(orjson reads them as floats): those cannot be put into an envelope, and ``api.ingest`` then
decides the body by the orjson path.

Each event first goes through a fast path that only recognises the well-formed case: string
fields checked inline, the time read without building a ``datetime`` (the common RFC 3339 forms
``YYYY-MM-DDTHH:MM:SS[.fff|.ffffff](Z|+00:00)``: the seconds part is converted once and cached,
the fraction is added as an integer). Anything the fast path does not recognise -- an error, an
unusual but valid time form -- goes through the general path, which decides and words every
problem. Both paths accept and reject exactly the same events with the same errors
(``tests/unit/api/test_ingest_parse.py`` checks this against a frozen copy of the earlier code).

Native event fields: ``id`` (required, idempotency key), ``type``, ``customer`` (required),
``time`` (RFC 3339 with offset, or integer epoch milliseconds; default: now), ``properties``
(object, default ``{}``). Unknown fields are rejected (catches typos such as ``costumer``).

CloudEvents fields (OpenMeter): ``id``, ``source``, ``specversion``, ``type``, ``subject`` (the
customer) are required; ``time`` is optional; ``data`` (object or null) becomes ``properties``;
other attributes (``datacontenttype``, ``dataschema``, extensions) are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeGuard

import msgspec
import orjson

from api.ingest_times import bulk_time_ms
from schemas.envelope import STORE_MS_MAX, STORE_MS_MIN, EventColumns, Row
from schemas.events import ID_MAX, Event
from schemas.jsonpath import json_kind
from schemas.timeutil import EPOCH_MS_MAX, EPOCH_MS_MIN, epoch_ms, parse_time
from tally.errors import PayloadTooLarge, UnsupportedMediaType, ValidationError

NATIVE_FIELDS = frozenset({"id", "type", "customer", "time", "properties"})
CLOUDEVENTS_REQUIRED = ("id", "source", "specversion", "type", "subject")

# Content types of POST /api/v1/events (OpenMeter): one event, a batch, or either.
CE_SINGLE = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"
JSON = "application/json"

# (id, type, customer, time_ms, properties): one event, as it goes into an envelope.

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
_ONE_S = timedelta(seconds=1)

# "YYYY-MM-DDTHH:MM:SS" -> epoch seconds of that UTC time (valid ones only). Events of one
# request mostly share a handful of seconds; bounded by clearing when full.
_SECONDS: dict[str, int] = {}
_SECONDS_MAX = 1 << 16
# "000".."999" -> 0..999: reads a millisecond fraction and checks it is three ASCII digits.
_MS3 = {f"{i:03d}": i for i in range(1000)}


def row_to_event(row: Row) -> Event:
    return Event.model_construct(
        id=row[0],
        type=row[1],
        customer=row[2],
        time=_EPOCH + timedelta(milliseconds=row[3]),
        properties=row[4],
    )


@dataclass(frozen=True, slots=True)
class Limits:
    max_events: int
    max_lateness_ms: int
    max_future_ms: int


@dataclass(slots=True)
class ParseResult:
    rows: list[Row] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)  # position in the request of each event
    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0

    @property
    def rejected_indexes(self) -> list[int]:
        return sorted({e["index"] for e in self.errors})


def load_json(raw: bytes, expected: str = "a JSON event or array of events") -> Any:
    """Decode a required request body; 400 naming the problem if it is empty (or only
    whitespace) or not JSON. ``expected`` says what to send instead of nothing."""
    if not raw or not raw.strip():
        raise ValidationError(
            f"request body is empty; send {expected}",
            details=[{"field": "body", "message": "empty body"}],
        )
    return _decode(raw)


def load_optional_json(raw: bytes, absent: Any) -> Any:
    """Decode an optional request body: ``absent`` for zero bytes; anything else must be JSON
    (a body of only whitespace is not: 400 naming ``body``; ``null`` is JSON's null)."""
    return absent if not raw else _decode(raw)


def _decode(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(
            f"request body is not valid JSON: {exc}",
            details=[{"field": "body", "message": f"malformed JSON: {exc}"}],
        ) from None


def as_items(doc: Any, *, single: bool = True, batch: bool = True) -> list[Any]:
    """A body as a list of raw events. ``single``/``batch`` say which shapes are allowed."""
    if isinstance(doc, list):
        if not batch:
            raise ValidationError(
                "this content type carries one event object, not an array",
                details=[{"field": "body", "message": "expected a JSON object"}],
            )
        if not doc:
            raise ValidationError(
                "the array of events is empty",
                details=[{"field": "body", "message": "empty array"}],
            )
        return doc
    if isinstance(doc, dict):
        if not single:
            raise ValidationError(
                "this content type carries an array of events",
                details=[{"field": "body", "message": "expected a JSON array"}],
            )
        return [doc]
    shape = "a JSON object" if not batch else "an array" if not single else "an object or array"
    raise ValidationError(
        f"request body must be {shape} of events, got {type(doc).__name__}",
        details=[{"field": "body", "message": f"expected {shape}"}],
    )


def check_count(n: int, limits: Limits) -> None:
    if n > limits.max_events:
        raise PayloadTooLarge(
            f"{n} events in one request; the limit is {limits.max_events} (max_events_per_request)",
            details=[{"field": "body", "message": f"at most {limits.max_events} events"}],
        )


def _err(out: list[dict[str, Any]], index: int, name: str, message: str) -> None:
    out.append({"index": index, "field": name, "message": message})


def _string(
    item: dict[str, Any], name: str, index: int, errors: list[dict[str, Any]], label: str = ""
) -> str | None:
    v = item.get(name)
    fld = label or name
    if v is None:
        _err(errors, index, fld, f"{fld} is required")
        return None
    if not isinstance(v, str):
        _err(errors, index, fld, f"{fld} must be a string, got {json_kind(v)}")
        return None
    if not v:
        _err(errors, index, fld, f"{fld} must not be empty")
        return None
    if len(v) > ID_MAX:
        _err(errors, index, fld, f"{fld} is longer than {ID_MAX} characters")
        return None
    return v


def _utc_seconds(head: str) -> int | None:
    """Epoch seconds of ``head`` (``YYYY-MM-DDTHH:MM:SS``) read as UTC, or None if invalid.
    Valid ones are cached."""
    if (
        len(head) != 19
        or head[4] != "-"
        or head[7] != "-"
        or head[10] != "T"
        or head[13] != ":"
        or head[16] != ":"
    ):
        return None
    try:
        sec = (datetime.fromisoformat(head + "+00:00") - _EPOCH) // _ONE_S
    except (ValueError, OverflowError):
        return None
    if len(_SECONDS) >= _SECONDS_MAX:
        _SECONDS.clear()
    _SECONDS[head] = sec
    return sec


def fast_time_ms(v: str) -> int | None:
    """Epoch ms of ``v`` if it has one of the common UTC forms, else None (not an error: the
    caller then takes the general path, which accepts other forms and words the problems).

    Recognised: ``YYYY-MM-DDTHH:MM:SS`` followed by ``Z`` or ``+00:00``, optionally with a
    3- or 6-digit fraction before it. The value is what ``datetime.fromisoformat`` gives,
    truncated to the millisecond.
    """
    n = len(v)
    if n == 24:  # .fffZ
        if v[19] != "." or v[23] != "Z":
            return None
        ms = _MS3.get(v[20:23])
    elif n == 20:  # Z
        ms = 0 if v[19] == "Z" else None
    elif n == 29:  # .fff+00:00
        ms = _MS3.get(v[20:23]) if v[19] == "." and v[23:] == "+00:00" else None
    elif n == 27:  # .ffffffZ
        ms = _MS3.get(v[20:23]) if v[19] == "." and v[26] == "Z" and v[23:26] in _MS3 else None
    elif n == 25:  # +00:00
        ms = 0 if v[19:] == "+00:00" else None
    elif n == 32:  # .ffffff+00:00
        ms = (
            _MS3.get(v[20:23]) if v[19] == "." and v[26:] == "+00:00" and v[23:26] in _MS3 else None
        )
    else:
        return None
    if ms is None:
        return None
    head = v[:19]
    sec = _SECONDS.get(head)
    if sec is None:
        sec = _utc_seconds(head)
        if sec is None:
            return None
    return sec * 1000 + ms


def _time(
    v: Any, index: int, now_ms: int, limits: Limits, errors: list[dict[str, Any]]
) -> int | None:
    """Parse ``time`` to epoch ms and apply the lateness bound (None = error recorded)."""
    if v is None:
        return now_ms
    if type(v) is int:
        if not EPOCH_MS_MIN <= v <= EPOCH_MS_MAX:
            _err(errors, index, "time", "invalid time: epoch milliseconds out of range")
            return None
        ms = v
    elif isinstance(v, str):
        read = fast_time_ms(v)
        if read is None:
            read = _general_time_ms(v, index, errors)
            if read is None:
                return None
        ms = read
    elif isinstance(v, float) and v.is_integer() and EPOCH_MS_MIN <= v <= EPOCH_MS_MAX:
        ms = int(v)
    else:
        _err(
            errors,
            index,
            "time",
            f"time must be an RFC 3339 string or integer epoch milliseconds, got {json_kind(v)}",
        )
        return None
    problem = time_bounds_problem(ms, now_ms, limits, "time")
    if problem is not None:
        _err(errors, index, "time", problem)
        return None
    return ms


def _general_time_ms(v: str, index: int, errors: list[dict[str, Any]]) -> int | None:
    """Any RFC 3339 form ``parse_time`` accepts, to epoch ms (None = error recorded)."""
    try:
        dt = datetime.fromisoformat(v)
        if dt.tzinfo is None or dt.utcoffset() is None:
            raise ValueError("no offset")  # let parse_time word the error
        return (dt - _EPOCH) // _ONE_MS
    except (ValueError, OverflowError):
        try:  # the slow path: lower-case 'z', surrounding blanks, precise error message
            return epoch_ms(parse_time(v))
        except (ValueError, OverflowError) as exc:
            _err(errors, index, "time", f"invalid time: {exc}")
            return None


def _fast_bounds(now_ms: int, limits: Limits) -> tuple[int, int]:
    """The times a fast path takes as they are: the lateness bounds, inside the store's range
    (years 1900..2299); anything else goes to the general path, which words the problem."""
    return (
        max(now_ms - limits.max_lateness_ms, STORE_MS_MIN),
        min(now_ms + limits.max_future_ms, STORE_MS_MAX),
    )


def time_bounds_problem(ms: int, now_ms: int, limits: Limits, name: str) -> str | None:
    """Why event time ``ms`` (field ``name``) is outside the lateness bounds (or the store's
    range, years 1900..2299: the worker could not store it), or None."""
    if ms < now_ms - limits.max_lateness_ms:
        return (
            f"{name} {_iso(ms)} is older than the lateness bound "
            f"({_span(limits.max_lateness_ms)} before now); the event is not accepted"
        )
    if ms > now_ms + limits.max_future_ms:
        return f"{name} {_iso(ms)} is more than {_span(limits.max_future_ms)} in the future"
    if not STORE_MS_MIN <= ms <= STORE_MS_MAX:
        return f"{name} {_iso(ms)} is outside the range Tally stores (years 1900..2299)"
    return None


def _iso(ms: int) -> str:
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")


def _span(ms: int) -> str:
    return str(timedelta(milliseconds=ms))


def parse_native(items: list[Any], now_ms: int, limits: Limits) -> ParseResult:
    """Validate native events. Every valid event is returned; every problem is listed."""
    res = ParseResult(total=len(items))
    errors = res.errors
    rows = res.rows
    indexes = res.indexes
    lo, hi = _fast_bounds(now_ms, limits)
    fields = NATIVE_FIELDS
    for index, item in enumerate(items):
        if type(item) is dict:
            # Fast path: a well-formed event (the common case) is checked inline.
            ev_id = item.get("id")
            ev_type = item.get("type")
            customer = item.get("customer")
            props = item.get("properties")
            if (
                type(ev_id) is str
                and type(ev_type) is str
                and type(customer) is str
                and 0 < len(ev_id) <= ID_MAX
                and 0 < len(ev_type) <= ID_MAX
                and 0 < len(customer) <= ID_MAX
                and (props is None or type(props) is dict)
                and fields.issuperset(item)
            ):
                v = item.get("time")
                if type(v) is str:
                    t = fast_time_ms(v)
                elif v is None:
                    t = now_ms
                elif type(v) is int and EPOCH_MS_MIN <= v <= EPOCH_MS_MAX:
                    t = v
                else:
                    t = None
                if t is None or not lo <= t <= hi:
                    t = _time(v, index, now_ms, limits, errors)
                if t is not None:
                    rows.append((ev_id, ev_type, customer, t, {} if props is None else props))
                    indexes.append(index)
                continue
        elif not isinstance(item, dict):
            _err(errors, index, "event", f"an event must be a JSON object, got {json_kind(item)}")
            continue
        # Slow path: report every problem of the event.
        n_err = len(errors)
        if not fields.issuperset(item):
            for extra in sorted(set(item) - fields):
                _err(errors, index, extra, f"unknown field {extra!r}")
        ev_id = _string(item, "id", index, errors)
        ev_type = _string(item, "type", index, errors)
        customer = _string(item, "customer", index, errors)
        t = _time(item.get("time"), index, now_ms, limits, errors)
        props = item.get("properties")
        if props is None:
            props = {}
        elif not isinstance(props, dict):
            _err(
                errors,
                index,
                "properties",
                f"properties must be an object, got {json_kind(props)}",
            )
        if len(errors) != n_err:
            continue
        assert ev_id is not None and ev_type is not None and customer is not None and t is not None
        rows.append((ev_id, ev_type, customer, t, props))
        indexes.append(index)
    return res


_IdText = Annotated[str, msgspec.Meta(min_length=1, max_length=ID_MAX)]


class _WellFormed(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A native event of the shape ``parse_native`` takes its fast path for (lengths in
    characters, as ``len``)."""

    id: _IdText
    type: _IdText
    customer: _IdText
    time: str | int | None = None
    properties: dict[str, Any] | None = None


class _WellFormedCloudEvent(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A CloudEvent of the shape ``parse_cloudevents`` takes its fast path for, its attributes
    under the native names. Extension attributes are not in it: the decoder would skip their
    values without the checks orjson makes (UTF-8, number range), so such a body goes to the
    general path; the two attributes read and ignored are decoded (checked) and dropped."""

    id: _IdText
    source: _IdText
    specversion: _IdText
    type: _IdText
    customer: _IdText = msgspec.field(name="subject")
    time: str | int | None = None
    properties: dict[str, Any] | None = msgspec.field(default=None, name="data")
    datacontenttype: Any = None
    dataschema: Any = None


_NATIVE_BODY = msgspec.json.Decoder(list[_WellFormed])
_CLOUDEVENTS_BODY = msgspec.json.Decoder(list[_WellFormedCloudEvent])


def parse_native_body(raw: bytes, now_ms: int, limits: Limits) -> EventColumns | None:
    """The events of a native body (an array) whose events are ALL valid, decoded and checked
    in one msgspec call, as columns (event ``i`` is the request's event ``i``); None for
    anything else (the caller then runs ``load_json`` / ``parse_native``, which word the
    problems). Same events as ``parse_native``'s rows except for integers beyond 64 bits in
    properties (see the module's docstring)."""
    return _body(_NATIVE_BODY, raw, now_ms, limits)


def parse_cloudevents_body(raw: bytes, now_ms: int, limits: Limits) -> EventColumns | None:
    """``parse_native_body`` for a batch of CloudEvents (``parse_cloudevents``' rows)."""
    return _body(_CLOUDEVENTS_BODY, raw, now_ms, limits)


def _body(
    decoder: msgspec.json.Decoder[list[_WellFormed]]
    | msgspec.json.Decoder[list[_WellFormedCloudEvent]],
    raw: bytes,
    now_ms: int,
    limits: Limits,
) -> EventColumns | None:
    try:
        events = decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    n = len(events)
    if not n or n > limits.max_events:
        return None
    lo, hi = _fast_bounds(now_ms, limits)
    values = [ev.time for ev in events]
    times = bulk_time_ms(values, lo, hi)  # one form in every event (the common case)
    if times is None:
        times = _times(values, now_ms, lo, hi)
        if times is None:
            return None
    props = [ev.properties for ev in events]
    if None in props:
        props = [{} if p is None else p for p in props]
    return EventColumns(
        [ev.id for ev in events],
        [ev.type for ev in events],
        [ev.customer for ev in events],
        times,
        props,  # type: ignore[arg-type]
    )


def _times(values: list[str | int | None], now_ms: int, lo: int, hi: int) -> list[int] | None:
    """The times one by one: ``now_ms`` for a missing one, integers as they are, strings of a
    form ``fast_time_ms`` reads; None when one is of another form or outside ``lo..hi``."""
    out: list[int] = []
    append = out.append
    for v in values:
        if v is None:
            t = now_ms
        elif isinstance(v, str):
            read = fast_time_ms(v)
            if read is None:
                return None
            t = read
        else:
            t = v
        if not lo <= t <= hi:
            return None
        append(t)
    return out


def _ok_string(v: Any) -> TypeGuard[str]:
    return type(v) is str and 0 < len(v) <= ID_MAX


def parse_cloudevents(items: list[Any], now_ms: int, limits: Limits) -> ParseResult:
    """Validate CloudEvents (OpenMeter wire format) and map them to events."""
    res = ParseResult(total=len(items))
    errors = res.errors
    rows = res.rows
    indexes = res.indexes
    lo, hi = _fast_bounds(now_ms, limits)
    ok = _ok_string
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            _err(errors, index, "event", f"an event must be a JSON object, got {json_kind(item)}")
            continue
        ev_id = item.get("id")
        ev_type = item.get("type")
        customer = item.get("subject")
        data = item.get("data")
        if (
            ok(ev_id)
            and ok(ev_type)
            and ok(customer)
            and ok(item.get("source"))
            and ok(item.get("specversion"))
            and (data is None or type(data) is dict)
        ):
            # Fast path: every required attribute is a valid string, data an object or null.
            v = item.get("time")
            if type(v) is str:
                t = fast_time_ms(v)
            elif v is None:
                t = now_ms
            else:
                t = None
            if t is None or not lo <= t <= hi:
                t = _time(v, index, now_ms, limits, errors)
            if t is not None:
                rows.append((ev_id, ev_type, customer, t, {} if data is None else data))
                indexes.append(index)
            continue
        # Slow path: report every problem of the event.
        n_err = len(errors)
        ev_id = _string(item, "id", index, errors)
        _string(item, "source", index, errors)
        _string(item, "specversion", index, errors)
        ev_type = _string(item, "type", index, errors)
        customer = _string(item, "subject", index, errors)
        t = _time(item.get("time"), index, now_ms, limits, errors)
        if data is None:
            data = {}
        elif not isinstance(data, dict):
            _err(errors, index, "data", f"data must be a JSON object, got {json_kind(data)}")
        if len(errors) != n_err:
            continue
        assert ev_id is not None and ev_type is not None and customer is not None and t is not None
        rows.append((ev_id, ev_type, customer, t, data))
        indexes.append(index)
    return res


def cloudevents_shape(content_type: str | None) -> tuple[bool, bool]:
    """(single allowed, batch allowed) for a Content-Type of POST /api/v1/events.

    Raises ``UnsupportedMediaType`` (415) for anything else; a missing header means JSON.
    """
    media = (content_type or JSON).split(";", 1)[0].strip().lower()
    if media == CE_SINGLE:
        return True, False
    if media == CE_BATCH:
        return False, True
    if media == JSON:
        return True, True
    raise UnsupportedMediaType(
        f"Content-Type {media!r} is not supported; use {CE_SINGLE}, {CE_BATCH} or {JSON}",
        details=[{"field": "content-type", "message": "unsupported media type"}],
    )


def native_shape(content_type: str | None) -> None:
    """POST /v1/events takes JSON (a missing Content-Type is read as JSON)."""
    media = (content_type or JSON).split(";", 1)[0].strip().lower()
    if media not in (JSON, CE_SINGLE, CE_BATCH) and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type {media!r} is not supported; send {JSON}",
            details=[{"field": "content-type", "message": "unsupported media type"}],
        )
