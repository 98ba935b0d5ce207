"""Ingest endpoints: ``POST /v1/events`` (native) and ``POST /api/v1/events`` (CloudEvents).

Both read the raw body (``Content-Length`` checked first, then the bytes actually read), decode it
once with orjson, validate every event (``api.ingest_parse``), group the valid ones into
envelopes per partition (``api.envelopes``) and produce them. The answer is 2xx only after the
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
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from api.auth import current_tenant
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
    parse_native,
)
from api.state import AppState, get_state
from schemas.envelope import Row, group_rows
from tally.errors import (
    BrokerUnavailable,
    PayloadTooLarge,
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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) before and while reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ValidationError(
                "invalid Content-Length header",
                details=[{"field": "content-length", "message": "not an integer"}],
            ) from None
        if n > limit:
            raise _too_large(limit, n)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, size, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int, size: int, at_least: bool = False) -> PayloadTooLarge:
    what = f"at least {size}" if at_least else str(size)
    return PayloadTooLarge(
        f"request body is {what} bytes; the limit is {limit} bytes (max_request_bytes)",
        details=[{"field": "body", "message": f"at most {limit} bytes"}],
    )


def limits_of(st: AppState) -> Limits:
    s = st.settings
    return Limits(
        max_events=s.max_events_per_request,
        max_lateness_ms=int(s.max_lateness.total_seconds() * 1000),
        max_future_ms=int(s.max_future.total_seconds() * 1000),
    )


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
    raw = await read_body(request, s.max_request_bytes)
    items = as_items(load_json(raw), single=single, batch=batch)
    limits = limits_of(st)
    check_count(len(items), limits)
    now_ms = time.time_ns() // 1_000_000
    parse = parse_native if api == "native" else parse_cloudevents
    res = parse(items, now_ms, limits)
    metrics = st.metrics
    if res.errors and (atomic or not res.rows):
        metrics.events.labels(api, "rejected").inc(res.total)
        prefix = "atomic request rejected: " if atomic and res.rows else ""
        raise ValidationError(prefix + _summary(res), details=res.errors)
    await deliver(st, tenant_id, res.rows, now_ms, wait, api)
    if res.errors:
        metrics.events.labels(api, "rejected").inc(len(res.rejected_indexes))
    if not res.errors:
        if api == "cloudevents":
            return Response(status_code=204)
        return json_response(202, {"accepted": len(res.rows), "rejected": []})
    body: dict[str, Any] = {"accepted": len(res.rows), "rejected": res.errors}
    return json_response(200, body)


async def deliver(
    st: AppState, tenant_id: str, rows: list[Row], now_ms: int, wait: WaitMode, api: str
) -> None:
    """Make validated ``rows`` durable: the one way events enter Tally (every ingest flavour).

    Groups the rows into envelopes per partition, produces them (acks=all) and, with
    ``wait=stored``, waits until the worker stored them. Returns only when that is done; raises
    ``Unavailable`` (503 + Retry-After) otherwise -- retrying is then safe because ingest is
    idempotent by event id. Counts the rows as accepted under the ``api`` label.
    """
    s = st.settings
    metrics = st.metrics
    producer = st.producer
    if producer is None:
        raise BrokerUnavailable("ingest is not configured on this server (no producer)")
    # the tenant's batch size, monthly quota and event rate, this process's in-flight events
    # (413 / 429 / 503 naming the limit; nothing is produced then)
    reservation = await st.limiter.admit_events(st, tenant_id, len(rows))
    try:
        envelopes = group_rows(tenant_id, now_ms, rows, producer.partitions, s.envelope_max_events)
        try:
            positions = await producer.produce(envelopes, key=tenant_id)
        except Unavailable:
            metrics.produce_failures.inc()
            raise
        st.limiter.commit(reservation, len(rows))
    finally:
        st.limiter.release(reservation)
    metrics.envelopes.inc(len(envelopes))
    del envelopes
    metrics.events.labels(api, "accepted").inc(len(rows))
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
                f"the {len(rows)} events were accepted by the broker but not stored within "
                f"{s.wait_stored_timeout_s:g}s; they will be stored. Retrying is safe: ingest is "
                "idempotent by event id",
                retry_after=s.retry_after_s,
                details=[
                    detail("wait", f"{len(rows)} events accepted by the broker, not stored yet")
                ],
            )


@router.post("/v1/events", status_code=202, tags=["ingest"])
async def ingest_native(
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    """Ingest one event object or an array of events (native format)."""
    return await _ingest(request, tenant_id, st, "native")


@router.post("/api/v1/events", status_code=204, tags=["openmeter"])
async def ingest_cloudevents(
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    """Ingest CloudEvents (OpenMeter wire format)."""
    return await _ingest(request, tenant_id, st, "cloudevents")
