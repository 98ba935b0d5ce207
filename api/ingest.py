"""Ingest endpoints: ``POST /v1/events`` (native) and ``POST /api/v1/events`` (CloudEvents).

Both read the raw body (``Content-Length`` checked first, then the bytes actually read), decode it
(an array of valid events in one msgspec call; any other body, or one whose properties the
envelope cannot hold, once with orjson), validate every event (``api.ingest_parse``), group the
valid ones into envelopes per partition (``schemas.envelope``) and produce them. The answer is 2xx only after the
broker acknowledged every envelope; with ``wait=stored`` also after the worker stored them.

Answers:

- native, all valid: 202 ``{"accepted": n, "rejected": []}``
- CloudEvents, all valid: 204 No Content (what OpenMeter and its SDK expect)
- some invalid: 200 ``{"accepted": n, "rejected": [{index, field, message}, ...]}``
  (the valid ones are accepted); ``?atomic=true``: 400 and nothing is accepted
- all invalid: 400 with ``details`` = the list
- too many events / bytes: 413 (also the tenant's ``max_batch_events``); broker down: 503 +
  Retry-After (nothing counts; retry)
- a tenant limit (``requests_per_second``, ``events_per_second``, ``monthly_events``): 429 +
  Retry-After naming it; too much in flight in this process: 503 ``overloaded`` (``api.limits``);
  nothing of a refused request was produced
- ``wait=stored`` timeout: 503 + Retry-After; the events ARE in the broker and will be stored,
  retrying is safe because ingest is idempotent by event id.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from api.auth import Tenant
from api.bodies import read_body
from api.errors import json_response
from api.ingest_parse import (
    Limits,
    ParseResult,
    as_items,
    check_count,
    cloudevents_shape,
    load_json,
    native_shape,
    parse_cloudevents,
    parse_cloudevents_body,
    parse_native,
    parse_native_body,
)
from api.openapi import BOOL_PARAM, RFC3339_STORE, doc, query, ref, setting
from api.state import AppState, Metrics, get_state
from schemas.envelope import STORE_MS_MAX, STORE_MS_MIN, EventColumns, Row, group_columns
from schemas.events import ID_MAX
from schemas.jsonschema import JSON_OBJECT, component
from tally import log as tally_log
from tally.errors import (
    BrokerUnavailable,
    Unavailable,
    ValidationError,
    detail,
)
from tally.settings import WaitMode

router = APIRouter()

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(name: str, value: str | None, default: bool = False) -> bool:
    if value is None:
        return default
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValidationError(
        f"query parameter {name!r} must be true or false, got {value!r}",
        details=[{"field": name, "message": "expected true or false"}],
    )


def parse_wait(value: str | None, st: AppState) -> WaitMode:
    if value is None:
        mode = st.settings.effective_ingest_wait
        if mode == WaitMode.STORED and st.progress_waiter is None:
            return WaitMode.BROKER
        return mode
    try:
        mode = WaitMode(value.strip().lower())
    except ValueError:
        raise ValidationError(
            f"query parameter 'wait' must be 'broker' or 'stored', got {value!r}",
            details=[{"field": "wait", "message": "expected broker or stored"}],
        ) from None
    if mode == WaitMode.STORED and st.progress_waiter is None:
        raise ValidationError(
            "wait=stored is not available on this server (no progress source configured)",
            details=[{"field": "wait", "message": "stored not available"}],
        )
    return mode


def limits_of(st: AppState) -> Limits:
    s = st.settings
    return Limits(
        max_events=s.max_events_per_request,
        max_lateness_ms=int(s.max_lateness.total_seconds() * 1000),
        max_future_ms=int(s.max_future.total_seconds() * 1000),
    )


class UnencodableEvents(ValidationError):
    """Events whose properties are nested too deeply to be written to the broker (the JSON
    encoder stops at 254 levels). ``positions``: their places in the ``events`` given to
    ``deliver``. Nothing was produced; callers reject these events and deliver the rest."""

    def __init__(
        self,
        message: str = "",
        *,
        positions: list[int] | None = None,
        details: Any = None,
        field: str | None = None,
    ) -> None:
        self.positions = list(positions or [])
        if details is None and field is None:
            details = [detail("properties", f"nested more than {MAX_NESTING} levels deep")]
        super().__init__(
            message
            or f"{len(self.positions)} events have properties nested too deeply (at most "
            f"{MAX_NESTING} levels)",
            details=details,
            field=field,
        )


MAX_NESTING = 251  # levels of properties that still fit the envelope encoder's 254


def unencodable_positions(events: EventColumns) -> list[int]:
    """Positions of the events that cannot be encoded into an envelope (the slow path, used
    only after an envelope failed to encode)."""
    bad = []
    for i in range(len(events)):
        try:
            orjson.dumps({"e": [list(events.row(i))]})
        except orjson.JSONEncodeError:
            bad.append(i)
    return bad


def nesting_problem() -> str:
    return f"properties are nested more than {MAX_NESTING} levels deep"


class Parsed(Protocol):
    """A parsed request (native, CloudEvents or Segment): the rows to deliver, each one's index
    in the request, and the per-event errors."""

    rows: list[Row]
    indexes: list[int]
    errors: list[dict[str, Any]]


def reject_unencodable(res: Parsed, positions: list[int]) -> None:
    """Move the rows at ``positions`` (``UnencodableEvents.positions``) from ``res.rows`` to
    ``res.errors``, in request order."""
    drop = set(positions)
    for pos in positions:
        res.errors.append(
            {"index": res.indexes[pos], "field": "properties", "message": nesting_problem()}
        )
    res.errors.sort(key=lambda e: e["index"])
    res.rows = [r for i, r in enumerate(res.rows) if i not in drop]
    res.indexes = [x for i, x in enumerate(res.indexes) if i not in drop]


# reasons of tally_ingest_rejected_events_total: the field at fault (a bounded set), else "other"
REJECT_REASONS = frozenset(
    {
        "event", "message", "id", "type", "customer", "time", "properties", "source",
        "specversion", "subject", "data", "messageId", "userId", "anonymousId", "timestamp",
    }
)  # fmt: skip


def count_rejected(
    metrics: Metrics, source: str, errors: list[dict[str, Any]], atomic_valid: int = 0
) -> None:
    """Count rejected events by reason: each event once, under its first error's field
    (``unknown_field`` for a field the format does not have; ``other`` for anything else), and
    ``atomic`` for valid events rejected with their request."""
    reasons: dict[int, str] = {}
    for e in errors:
        idx = e.get("index")
        if not isinstance(idx, int) or idx in reasons:
            continue
        name = str(e.get("field", ""))
        if str(e.get("message", "")).startswith("unknown field"):
            reasons[idx] = "unknown_field"
        else:
            reasons[idx] = name if name in REJECT_REASONS else "other"
    counts: dict[str, int] = {}
    for r in reasons.values():
        counts[r] = counts.get(r, 0) + 1
    if atomic_valid:
        counts["atomic"] = atomic_valid
    for reason, n in counts.items():
        metrics.rejected.labels(source, reason).inc(n)
    total = sum(counts.values())
    if total:
        metrics.events.labels(source, "rejected").inc(total)
    tally_log.note(rejected=total)


def _summary(res: ParseResult, limit: int = 5) -> str:
    bad = len(res.rejected_indexes)
    parts = [f"[{e['index']}] {e['field']}: {e['message']}" for e in res.errors[:limit]]
    more = f" (and {len(res.errors) - limit} more)" if len(res.errors) > limit else ""
    return f"{bad} of {res.total} events are invalid: " + "; ".join(parts) + more


async def _ingest(request: Request, tenant_id: str, st: AppState, api: str) -> Response:
    s = st.settings
    atomic = parse_bool("atomic", request.query_params.get("atomic"))
    wait = parse_wait(request.query_params.get("wait"), st)
    content_type = request.headers.get("content-type")
    if api == "native":
        native_shape(content_type)
        single, batch = True, True
    else:
        single, batch = cloudevents_shape(content_type)
    raw = await read_body(request, s.max_request_bytes, "max_request_bytes")
    st.metrics.ingest_bytes.labels(api).inc(len(raw))
    limits = limits_of(st)
    now_ms = time.time_ns() // 1_000_000
    if batch:  # an array of events, all valid: one decoder call (else None)
        read = parse_native_body if api == "native" else parse_cloudevents_body
        fast = read(raw, now_ms, limits)
        if fast is not None:
            try:
                await deliver(st, tenant_id, fast, now_ms, wait, api)
                return _all_accepted(api, len(fast))
            except UnencodableEvents:
                pass  # nested too deep, integers beyond 64 bits: decided below (none produced)
    items = as_items(load_json(raw), single=single, batch=batch)
    check_count(len(items), limits)
    parse = parse_native if api == "native" else parse_cloudevents
    res = parse(items, now_ms, limits)
    if res.errors and (atomic or not res.rows):
        count_rejected(st.metrics, api, res.errors, atomic_valid=len(res.rows))
        prefix = "atomic request rejected: " if atomic and res.rows else ""
        raise ValidationError(prefix + _summary(res), details=res.errors)
    try:
        await deliver(st, tenant_id, EventColumns.of_rows(res.rows), now_ms, wait, api)
    except UnencodableEvents as exc:  # rare: reject those events, deliver their neighbours
        reject_unencodable(res, exc.positions)
        if atomic or not res.rows:
            count_rejected(st.metrics, api, res.errors, atomic_valid=len(res.rows))
            prefix = "atomic request rejected: " if atomic and res.rows else ""
            raise ValidationError(prefix + _summary(res), details=res.errors) from None
        await deliver(st, tenant_id, EventColumns.of_rows(res.rows), now_ms, wait, api)
    if not res.errors:
        return _all_accepted(api, len(res.rows))
    count_rejected(st.metrics, api, res.errors)
    body: dict[str, Any] = {"accepted": len(res.rows), "rejected": res.errors}
    return json_response(200, body)


def _all_accepted(api: str, n: int) -> Response:
    """The answer when every event of the request was accepted."""
    if api == "cloudevents":
        return Response(status_code=204)
    return json_response(202, {"accepted": n, "rejected": []})


async def deliver(
    st: AppState, tenant_id: str, events: EventColumns, now_ms: int, wait: WaitMode, api: str
) -> None:
    """Make validated ``events`` durable: the one way events enter Tally (every ingest flavour).

    Groups the events into envelopes per partition, produces them (acks=all) and, with
    ``wait=stored``, waits until the worker stored them. Returns only when that is done; raises
    ``Unavailable`` (503 + Retry-After) otherwise -- retrying is then safe because ingest is
    idempotent by event id. Counts the events under the ``api`` source label: ``accepted`` (the
    first event of each id in the request) and ``duplicate_in_request`` (later events with an id
    seen earlier in the request; they are produced too and the worker keeps the first copy).
    """
    s = st.settings
    metrics = st.metrics
    producer = st.producer
    if producer is None:
        raise BrokerUnavailable("ingest is not configured on this server (no producer)")
    # encoded before the limits are asked, so that a request redone without its unencodable
    # events takes the tenant's event rate once
    try:
        envelopes = group_columns(
            tenant_id, now_ms, events, producer.partitions, s.envelope_max_events
        )
    except orjson.JSONEncodeError:
        raise UnencodableEvents(positions=unencodable_positions(events)) from None
    # the tenant's batch size, monthly quota and event rate, this process's in-flight events
    # (413 / 429 / 503 naming the limit; nothing is produced then)
    reservation = await st.limiter.admit_events(st, tenant_id, len(events))
    try:
        metrics.producer_queue.inc(len(events))
        started = time.perf_counter()
        try:
            positions = await producer.produce(envelopes, key=tenant_id)
        except Unavailable:
            metrics.produce_failures.inc()
            metrics.broker_errors.inc()
            raise
        finally:
            metrics.producer_queue.dec(len(events))
        st.limiter.commit(reservation, len(events))
    finally:
        st.limiter.release(reservation)
    metrics.producer_delivery.observe(time.perf_counter() - started)
    metrics.envelopes.inc(len(envelopes))
    del envelopes
    unique = len(set(events.ids))
    metrics.events.labels(api, "accepted").inc(unique)
    if unique != len(events):
        metrics.events.labels(api, "duplicate_in_request").inc(len(events) - unique)
    metrics.tenant_events.inc(tenant_id, unique)
    tally_log.note(events=len(events), accepted=unique)
    if wait == WaitMode.STORED:
        assert st.progress_waiter is not None
        targets: dict[int, int] = {}
        for partition, offset in positions:
            if offset > targets.get(partition, -1):
                targets[partition] = offset
        stored = await st.progress_waiter.wait_for(producer.topic, targets, s.wait_stored_timeout_s)
        if not stored:
            metrics.wait_stored_timeouts.inc()
            raise Unavailable(
                f"the {len(events)} events were accepted by the broker but not stored within "
                f"{s.wait_stored_timeout_s:g}s; they will be stored. Retrying is safe: ingest is "
                "idempotent by event id",
                retry_after=s.retry_after_s,
                details=[
                    detail("wait", f"{len(events)} events accepted by the broker, not stored yet")
                ],
            )


# --- OpenAPI -----------------------------------------------------------------------------------

JSON_VALUE_REF = component("JsonValue")

_TEXT = {"type": "string", "minLength": 1, "maxLength": ID_MAX}
EVENT_TIME = {
    "description": "RFC 3339 date-time with an offset, or integer epoch milliseconds; default: "
    "now. Must lie within max_lateness before and max_future after now (settings; default 35 "
    "days / 5 minutes) and in the years 1900..2299.",
    "anyOf": [
        {"type": "string", "pattern": RFC3339_STORE},
        {"type": "integer", "minimum": STORE_MS_MIN, "maximum": STORE_MS_MAX},
        {"type": "null"},
    ],
}
PROPERTIES = {
    "description": "Free-form JSON object (at most 251 levels of nesting); null = {}",
    "anyOf": [JSON_OBJECT, {"type": "null"}],
}
NATIVE_EVENT = {
    "type": "object",
    "description": "One usage event. `id` is the idempotency key (unique per tenant): a retry "
    "with the same id counts once. Unknown fields are rejected.",
    "required": ["id", "type", "customer"],
    "additionalProperties": False,
    "properties": {
        "id": _TEXT,
        "type": _TEXT,
        "customer": {**_TEXT, "description": "the customer's external id"},
        "time": EVENT_TIME,
        "properties": PROPERTIES,
    },
}
CLOUD_EVENT = {
    "type": "object",
    "description": "A CloudEvent (OpenMeter's wire format): `subject` is the customer, `data` "
    "the properties; other attributes (datacontenttype, dataschema, extensions) are ignored.",
    "required": ["id", "source", "specversion", "type", "subject"],
    "additionalProperties": JSON_VALUE_REF,
    "properties": {
        "id": _TEXT,
        "source": _TEXT,
        "specversion": _TEXT,
        "type": _TEXT,
        "subject": _TEXT,
        "time": EVENT_TIME,
        "data": PROPERTIES,
    },
}


def _batch(item: dict[str, Any]) -> dict[str, Any]:
    """A batch: accepted when at least one element is a valid event (the others are listed in
    ``rejected``, answer 200), unless ``atomic=true`` (then every element must be valid)."""
    return {
        "type": "array",
        "description": "Events; elements that are not valid events are rejected one by one "
        "(answer 200 with `rejected`) unless atomic=true",
        "minItems": 1,
        "maxItems": setting("max_events_per_request"),
        "contains": item,
    }


INGEST_RESULT = {
    "type": "object",
    "required": ["accepted", "rejected"],
    "properties": {
        "accepted": {"type": "integer", "minimum": 0},
        "rejected": {"type": "array", "items": ref("EventProblem")},
    },
}
PARTIAL = {
    "description": "Some events were invalid: the valid ones were accepted (as with 202), the "
    "others are listed in `rejected` (`?atomic=true` rejects the whole request instead)",
    "content": {"application/json": {"schema": INGEST_RESULT}},
}
INGEST_PARAMS = [
    query(
        "atomic",
        BOOL_PARAM,
        "true: one invalid event rejects the whole request (400); default false: the valid "
        "events are accepted and the invalid ones listed",
    ),
    query(
        "wait",
        {"type": "string", "enum": ["broker", "stored"]},
        "broker: answer once the broker acknowledged the events; stored: once the worker "
        "stored them (default: stored in embedded mode when available, else broker)",
    ),
]


@router.post(
    "/v1/events",
    status_code=202,
    tags=["ingest"],
    **doc(
        ok={202: INGEST_RESULT, 200: PARTIAL},
        bodies={"application/json": {"anyOf": [NATIVE_EVENT, _batch(NATIVE_EVENT)]}},
        params=INGEST_PARAMS,
        errors=(415,),
        body_description="One event or an array of events (at most max_events_per_request, "
        "and max_request_bytes bytes)",
    ),
)
async def ingest_native(
    request: Request,
    tenant_id: Tenant,
    st: AppState = Depends(get_state),
) -> Response:
    """Ingest one event object or an array of events (native format)."""
    return await _ingest(request, tenant_id, st, "native")


@router.post(
    "/api/v1/events",
    status_code=204,
    tags=["openmeter"],
    **doc(
        ok={204: None, 200: PARTIAL},
        bodies={
            "application/cloudevents+json": CLOUD_EVENT,
            "application/cloudevents-batch+json": _batch(CLOUD_EVENT),
            "application/json": {"anyOf": [CLOUD_EVENT, _batch(CLOUD_EVENT)]},
        },
        params=INGEST_PARAMS,
        errors=(415,),
        body_description="One CloudEvent (application/cloudevents+json), a batch "
        "(application/cloudevents-batch+json) or either (application/json)",
    ),
)
async def ingest_cloudevents(
    request: Request,
    tenant_id: Tenant,
    st: AppState = Depends(get_state),
) -> Response:
    """Ingest CloudEvents (OpenMeter wire format)."""
    return await _ingest(request, tenant_id, st, "cloudevents")
