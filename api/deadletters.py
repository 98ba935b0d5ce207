"""Dead letters: list them (a tenant its own, the admin all), look at one, re-drive them.

A dead letter is a message or event of the events topic the worker could not use
(``schemas.deadletters``; docs/operations.md, "Dead letters"). Re-driving produces its payload
to the current events topic through the normal producer (acks=all) once the cause is fixed:

- an envelope is decoded with this version's rules and its events are produced again, grouped
  per partition exactly like ingest (same tenant, same ``at``); dedupe by event id makes a repeat
  harmless, so re-driving twice, or a dead letter whose events got in another way, stays exact;
- a control message is produced again to its partition;
- what still cannot be decoded is refused (409, naming the problem), as are ``meter_value``
  (the event IS stored: correct it or fix the meter and backfill), ``empty_message`` and a
  payload cut at ``dead_letter_max_payload_bytes``.

Every re-drive is recorded (``dead_letter_redrives``): when, by whom, where to.
"""

from __future__ import annotations

import base64
from typing import Any

import pydantic
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from api import answers as A
from api.auth import Tenant, require_admin
from api.bodies import SMALL_BODY, parse_body
from api.errors import json_response
from api.openapi import BOOL_PARAM, LIMIT_PARAM, OFFSET_PARAM, doc, int_query, query
from api.state import AppState, State
from clickhouse.deadletters import DeadLetterRecord, DeadLetterRepo
from schemas.control import ControlError, decode_control, is_control
from schemas.deadletters import METER_VALUE, REASONS, REDRIVABLE
from schemas.envelope import EnvelopeError, OutgoingEnvelope, decode, group_rows
from schemas.jsonschema import JsonInt
from schemas.timeutil import from_epoch_ms, to_ms
from tally.errors import BrokerUnavailable, Conflict, NotFound, ValidationError, detail

router = APIRouter()
admin_router = APIRouter(dependencies=[Depends(require_admin)])

MAX_BULK = 1000


# --- answers ----------------------------------------------------------------------------------


def _iso(dt: Any) -> str:
    return str(to_ms(dt).isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def redrivable(r: DeadLetterRecord) -> bool:
    return r.reason in REDRIVABLE and not r.payload_truncated and r.payload_bytes > 0


def excerpt(r: DeadLetterRecord) -> str:
    """The start of the payload as text (undecodable bytes replaced; ``...`` when cut)."""
    text = r.payload_excerpt.decode("utf-8", errors="replace")
    return text + "..." if r.payload_bytes > len(r.payload_excerpt) else text


def dead_letter_json(r: DeadLetterRecord) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": r.dead_letter_id,
        "tenant_id": r.tenant_id or None,
        "reason": r.reason,
        "message": r.message,
        "source": {
            "topic": r.topic,
            "partition": r.partition,
            "offset": r.offset,
            "index": r.index if r.index >= 0 else None,
        },
        "event_id": r.event_id or None,
        "meter_id": r.meter_id or None,
        "produced_at": _iso(from_epoch_ms(r.produced_at_ms)) if r.produced_at_ms >= 0 else None,
        "payload_bytes": r.payload_bytes,
        "payload_truncated": r.payload_truncated,
        "redrivable": redrivable(r),
        "redrives": r.redrives,
        "last_redriven_at": _iso(r.last_redriven_at) if r.last_redriven_at else None,
        "payload_excerpt": excerpt(r),
    }
    if r.payload is not None:
        try:
            body["payload"] = r.payload.decode("utf-8")
        except UnicodeDecodeError:
            body["payload"] = None
        body["payload_base64"] = base64.b64encode(r.payload).decode("ascii")
    return body


# --- query parameters -------------------------------------------------------------------------


def _reason(request: Request) -> str | None:
    raw = request.query_params.get("reason")
    if raw is None:
        return None
    if raw not in REASONS:
        raise ValidationError(
            f"reason must be one of {', '.join(REASONS)}",
            details=[detail("reason", f"unknown reason {raw!r}")],
        )
    return raw


def _bool(request: Request, name: str) -> bool | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise ValidationError(
            f"{name} must be true or false", details=[detail(name, "expected true or false")]
        )
    return value == "true"


def _text(request: Request, name: str) -> str | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not raw or len(raw) > 256:
        raise ValidationError(
            f"{name} must be 1..256 characters", details=[detail(name, "1..256 characters")]
        )
    return raw


async def _list(request: Request, st: AppState, tenant_id: str | None) -> Response:
    repo = DeadLetterRepo(st.store)
    rows = await st.run(
        repo.list,
        tenant_id,
        reason=_reason(request),
        topic=_text(request, "topic"),
        redriven=_bool(request, "redriven"),
        limit=int_query(request, "limit", 100, 1, 1000),
        offset=int_query(request, "offset", 0, 0, 1_000_000_000),
    )
    return json_response(200, {"data": [dead_letter_json(r) for r in rows]})


async def _get(st: AppState, tenant_id: str | None, dead_letter_id: str) -> DeadLetterRecord:
    found: DeadLetterRecord | None = await st.run(
        DeadLetterRepo(st.store).get, tenant_id, dead_letter_id
    )
    if found is None:
        raise NotFound(f"dead letter {dead_letter_id!r} not found", field="dead_letter_id")
    return found


# --- re-drive ---------------------------------------------------------------------------------


def plan_redrive(r: DeadLetterRecord, partitions: int, max_events: int) -> list[OutgoingEnvelope]:
    """What to produce again for ``r`` (pure), or Conflict saying why it cannot be re-driven."""
    if r.reason == METER_VALUE:
        raise Conflict(
            "this event is stored (and counted by its other meters); re-driving it would be "
            "dropped as a duplicate. Correct it (POST /v1/events/{id}/corrections) or fix the "
            "meter and backfill it",
            field="reason",
        )
    if r.payload_truncated:
        raise Conflict(
            f"the payload was cut at {len(r.payload or b'')} of {r.payload_bytes} bytes "
            "(dead_letter_max_payload_bytes); it cannot be re-driven",
            field="payload_truncated",
        )
    payload = r.payload or b""
    if not payload:
        raise Conflict("the dead letter has no payload to re-drive", field="payload")
    if is_control(payload):
        try:
            decode_control(payload)
        except ControlError as exc:
            raise Conflict(
                f"the control message still cannot be read: {exc}", field="payload"
            ) from None
        return [OutgoingEnvelope(r.partition % partitions, payload, ())]
    try:
        env = decode(payload)
    except EnvelopeError as exc:
        raise Conflict(f"the payload still cannot be decoded: {exc}", field="payload") from None
    if env.rejected:
        problems = "; ".join(f"[{x.index}] {x.problem}" for x in env.rejected[:5])
        raise Conflict(
            f"{len(env.rejected)} events of the payload are still invalid: {problems}",
            field="payload",
        )
    if not env.events:
        raise Conflict("the payload holds no events", field="payload")
    rows = [(e.id, e.type, e.customer, e.time_ms, e.properties) for e in env.events]
    return group_rows(env.tenant_id, env.ingested_at_ms, rows, partitions, max_events)


async def redrive(st: AppState, r: DeadLetterRecord, actor: str) -> dict[str, Any]:
    producer = st.producer
    if producer is None:
        raise BrokerUnavailable(
            "dead letters cannot be re-driven on this server: it has no broker producer",
            retry_after=st.settings.retry_after_s,
        )
    envelopes = plan_redrive(r, producer.partitions, st.settings.envelope_max_events)
    positions = await producer.produce(envelopes, key=r.tenant_id)
    events = sum(len(e.event_ids) for e in envelopes)
    at = await st.run(
        DeadLetterRepo(st.store).record_redrive,
        r,
        actor=actor,
        topic=producer.topic,
        messages=len(envelopes),
        events=events,
    )
    return {
        "id": r.dead_letter_id,
        "topic": producer.topic,
        "messages": len(envelopes),
        "events": events,
        "positions": [{"partition": p, "offset": o} for p, o in positions],
        "redriven_at": _iso(at),
    }


class BulkRedriveIn(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    tenant_id: str | None = pydantic.Field(None, min_length=1, max_length=64)
    reason: str | None = None
    topic: str | None = pydantic.Field(None, min_length=1, max_length=256)
    limit: JsonInt = pydantic.Field(100, ge=1, le=MAX_BULK)
    include_redriven: bool = pydantic.Field(False, strict=True)

    @pydantic.field_validator("reason")
    @classmethod
    def _reason(cls, v: str | None) -> str | None:
        if v is not None and v not in REASONS:
            raise ValueError(f"unknown reason {v!r} (known: {', '.join(REASONS)})")
        return v


# --- OpenAPI -----------------------------------------------------------------------------------

_FILTERS = [
    query("reason", {"type": "string", "enum": list(REASONS)}, "only this reason"),
    query("topic", {"type": "string", "minLength": 1, "maxLength": 256}, "only this topic"),
    query("redriven", BOOL_PARAM, "true: only re-driven ones; false: only the others"),
    query("limit", LIMIT_PARAM, "at most this many (default 100)"),
    query("offset", OFFSET_PARAM, "skip this many (default 0), in source order"),
]
_ADMIN_FILTERS = [
    query(
        "tenant_id",
        {"type": "string", "minLength": 1, "maxLength": 256},
        "only this tenant's (default: all, including those without a known tenant)",
    ),
    *_FILTERS,
]

# --- tenant routes ----------------------------------------------------------------------------


@router.get(
    "/v1/dead-letters",
    tags=["dead letters"],
    **doc(ok={200: A.data_of(A.DEAD_LETTER)}, params=_FILTERS),
)
async def list_dead_letters(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    """The calling tenant's dead letters, in source order (without payloads)."""
    return await _list(request, st, tenant_id)


@router.get(
    "/v1/dead-letters/{dead_letter_id}",
    tags=["dead letters"],
    **doc(ok={200: A.DEAD_LETTER_FULL}),
)
async def get_dead_letter(
    dead_letter_id: str,
    tenant_id: Tenant,
    st: State,
) -> Response:
    """One of the calling tenant's dead letters, with its payload."""
    return json_response(200, dead_letter_json(await _get(st, tenant_id, dead_letter_id)))


# --- admin routes -----------------------------------------------------------------------------


@admin_router.get(
    "/v1/admin/dead-letters",
    tags=["admin"],
    **doc(ok={200: A.data_of(A.DEAD_LETTER)}, params=_ADMIN_FILTERS),
)
async def admin_list_dead_letters(request: Request, st: State) -> Response:
    """Every tenant's dead letters (``tenant_id`` to narrow), in source order."""
    tenant = _text(request, "tenant_id")
    return await _list(request, st, tenant)


@admin_router.get(
    "/v1/admin/dead-letters/{dead_letter_id}",
    tags=["admin"],
    **doc(ok={200: A.DEAD_LETTER_FULL}),
)
async def admin_get_dead_letter(dead_letter_id: str, st: State) -> Response:
    return json_response(200, dead_letter_json(await _get(st, None, dead_letter_id)))


@admin_router.post(
    "/v1/admin/dead-letters/{dead_letter_id}/redrive",
    tags=["admin"],
    **doc(ok={200: A.REDRIVE_RESULT}, errors=(409,)),
)
async def admin_redrive(dead_letter_id: str, st: State) -> Response:
    """Produce the dead letter's payload to the events topic again (after a fix)."""
    r = await _get(st, None, dead_letter_id)
    return json_response(200, await redrive(st, r, "admin"))


@admin_router.post(
    "/v1/admin/dead-letters/redrive",
    tags=["admin"],
    **doc(ok={200: A.BULK_REDRIVE}, body=A.BULK_REDRIVE_IN, body_required=False),
)
async def admin_redrive_many(request: Request, st: State) -> Response:
    """Re-drive the dead letters that match (not re-driven yet unless ``include_redriven``), in
    source order, up to ``limit``; those that cannot be re-driven are listed in ``refused``."""
    body = await parse_body(
        request, BulkRedriveIn, "re-drive request", limit=SMALL_BODY, optional=True
    )
    rows: list[DeadLetterRecord] = await st.run(
        DeadLetterRepo(st.store).list,
        body.tenant_id,
        reason=body.reason,
        topic=body.topic,
        redriven=None if body.include_redriven else False,
        limit=body.limit,
    )
    done: list[dict[str, Any]] = []
    refused: list[dict[str, str]] = []
    for row in rows:
        full = await _get(st, row.tenant_id, row.dead_letter_id)
        try:
            done.append(await redrive(st, full, "admin"))
        except Conflict as exc:
            refused.append({"id": row.dead_letter_id, "message": exc.message})
    return json_response(200, {"redriven": done, "refused": refused})
