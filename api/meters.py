"""Meter endpoints: native CRUD under /v1/meters, OpenMeter read forms under /api/v1/meters.

Creating a meter (docs/architecture.md, "Meter activation"): the meter is stored ``pending`` with
``activation_topic`` = the events topic of this server, one ``activate_meter`` control message is
produced to EVERY partition of that topic (acks=all, idempotent producer, as ingest), and only
when all are acknowledged is the meter marked ``active`` and 201 returned. The worker applies the
meter to the events after its marker in each partition; ``POST /v1/meters/{slug}/backfill``
counts the events before. Broker down: 503 + Retry-After and the meter stays ``pending``;
sending the same create again finishes it (markers are produced again; repeats are harmless).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import anyio
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from api import answers as A
from api.auth import Tenant
from api.bodies import object_body, read_body
from api.errors import json_response
from api.openapi import doc, link
from api.state import AppState, State
from clickhouse.backfill import BackfillStore
from schemas.backfill import COMPLETE, RUNNING, RunRecord
from schemas.control import encode_activate
from schemas.envelope import OutgoingEnvelope
from schemas.meters import Meter, MeterSpec, MeterStatus
from schemas.timeutil import from_epoch_ms, to_ms
from streams.backfill import BackfillRunner, LiveTopic
from tally.errors import BrokerUnavailable, Conflict

router = APIRouter()

MAX_METER_BODY = 64 * 1024


def parse_meter_spec(raw: bytes) -> MeterSpec:
    """Validate a MeterSpec JSON body; 400 naming every bad field."""
    return object_body(raw, MeterSpec, "meter")


def _iso(dt: Any) -> str:
    return str(to_ms(dt).isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def meter_native(m: Meter) -> dict[str, Any]:
    body: dict[str, Any] = m.model_dump(mode="json", by_alias=False, exclude={"activation_topic"})
    body["created_at"] = _iso(m.created_at)
    return body


def meter_openmeter(m: Meter) -> dict[str, Any]:
    """OpenMeter's meter shape (the fields its SDK reads)."""
    created = _iso(m.created_at)
    body: dict[str, Any] = {
        "id": m.id,
        "slug": m.slug,
        "name": m.name or m.slug,
        "eventType": m.event_type,
        "aggregation": m.aggregation.value.upper(),
        "groupBy": dict(m.group_by),
        "windowSize": "MINUTE",
        "createdAt": created,
        "updatedAt": created,
    }
    if m.description is not None:
        body["description"] = m.description
    if m.value_property is not None:
        body["valueProperty"] = m.value_property
    return body


@router.post(
    "/v1/meters",
    status_code=201,
    tags=["meters"],
    **doc(ok={201: A.METER_OUT}, body=A.METER_IN, errors=(409,)),
)
async def create_meter(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    spec = parse_meter_spec(await read_body(request, MAX_METER_BODY))
    meter, _created = await activate_meter(st, tenant_id, spec)
    return json_response(201, meter_native(meter))


async def activate_meter(
    st: AppState, tenant_id: str, spec: MeterSpec, *, existing_ok: bool = False
) -> tuple[Meter, bool]:
    """Create the meter, or finish the activation of a pending one with the same spec.

    Returns the active meter and whether this call activated it. Conflict when the slug exists
    with another spec, or (unless ``existing_ok``) is already active. BrokerUnavailable (503)
    when the markers were not all acknowledged; the meter then stays pending.
    """
    producer = st.producer
    if producer is None:
        raise BrokerUnavailable(
            "meters cannot be created on this server: it has no broker producer (a meter starts "
            "with activation markers on the events topic)",
            retry_after=st.settings.retry_after_s,
        )
    meter: Meter | None = await st.run(st.repo.find_meter, tenant_id, spec.slug)
    if meter is not None:
        if meter.spec() != spec:
            raise Conflict(
                f"meter '{spec.slug}' already exists with a different definition; delete it "
                "first (DELETE /v1/meters/{slug}): changing a meter in place would change history",
                details=[{"field": "slug", "message": "exists with a different definition"}],
            )
        if meter.status == MeterStatus.ACTIVE:
            if existing_ok:
                return meter, False
            raise Conflict(
                f"meter '{spec.slug}' already exists",
                details=[{"field": "slug", "message": "already exists"}],
            )
    else:
        meter = await st.run(st.repo.create_meter, tenant_id, spec, activation_topic=producer.topic)
    assert meter is not None
    if meter.activation_topic == producer.topic:
        # One marker per partition, explicit partition numbers. A meter left pending by an
        # earlier topic generation needs none: it applies to every event of newer topics.
        payload = encode_activate(meter)
        markers = [OutgoingEnvelope(p, payload, ()) for p in range(producer.partitions)]
        await producer.produce(markers, key=tenant_id)
    active: Meter = await st.run(st.repo.activate_meter, meter)
    st.meters.forget(tenant_id, spec.slug)
    return active, True


@router.get("/v1/meters", tags=["meters"], **doc(ok={200: A.data_of(A.METER_OUT)}))
async def list_meters(tenant_id: Tenant, st: State) -> Response:
    meters: list[Meter] = await st.run(st.repo.list_meters, tenant_id)
    return json_response(200, {"data": [meter_native(m) for m in meters]})


@router.get("/v1/meters/{slug}", tags=["meters"], **doc(ok={200: A.METER_OUT}))
async def get_meter(slug: str, tenant_id: Tenant, st: State) -> Response:
    meter: Meter = await st.run(st.repo.get_meter, tenant_id, slug)
    return json_response(200, meter_native(meter))


@router.delete("/v1/meters/{slug}", status_code=204, tags=["meters"], **doc(ok={204: None}))
async def delete_meter(slug: str, tenant_id: Tenant, st: State) -> Response:
    await st.run(st.repo.get_meter, tenant_id, slug)  # 404 naming the slug if absent
    await st.run(st.repo.delete_meter, tenant_id, slug)
    st.meters.forget(tenant_id, slug)
    return Response(status_code=204)


@router.get(
    "/api/v1/meters",
    tags=["openmeter"],
    **doc(ok={200: {"type": "array", "items": A.OM_METER}}),
)
async def om_list_meters(tenant_id: Tenant, st: State) -> Response:
    meters: list[Meter] = await st.run(st.repo.list_meters, tenant_id)
    return Response(
        orjson.dumps([meter_openmeter(m) for m in meters]), media_type="application/json"
    )


@router.get("/api/v1/meters/{slug}", tags=["openmeter"], **doc(ok={200: A.OM_METER}))
async def om_get_meter(slug: str, tenant_id: Tenant, st: State) -> Response:
    meter: Meter = await st.run(st.repo.get_meter, tenant_id, slug)
    return json_response(200, meter_openmeter(meter))


@router.post(
    "/v1/meters/{slug}/backfill",
    tags=["meters"],
    **doc(ok={200: A.BACKFILL_RESULT}, errors=(400, 409)),
)
async def backfill_meter(slug: str, tenant_id: Tenant, st: State) -> Response:
    """Count the meter's events from before its activation markers (the history). Exclusive per
    meter (409 while another run is active); resumes an interrupted run; atomic swap."""
    return json_response(200, await run_backfill(st, tenant_id, slug))


@router.get("/v1/meters/{slug}/backfill", tags=["meters"], **doc(ok={200: A.BACKFILL_RUNS}))
async def backfill_status(slug: str, tenant_id: Tenant, st: State) -> Response:
    """The meter's backfill runs; ``visible_run`` is the one usage queries read."""
    return json_response(200, await backfill_runs(st, tenant_id, slug))


def live_topic(st: AppState) -> LiveTopic:
    """The topic this server produces to (the worker consumes it now)."""
    if st.producer is not None:
        return LiveTopic(st.producer.topic, st.producer.partitions)
    return LiveTopic(st.settings.events_topic, st.settings.events_partitions)


async def run_backfill(st: AppState, tenant_id: str, slug: str) -> dict[str, Any]:
    meter: Meter = await st.run(st.repo.get_meter, tenant_id, slug)
    s = st.settings
    runner = BackfillRunner(
        BackfillStore(st.store),
        meter,
        live=live_topic(st),
        chunk_events=s.backfill_chunk_events,
        lease_s=s.backfill_lease_s,
        wait_s=s.backfill_wait_s,
    )
    # A long job: its own thread, not the request store limiter (which it would hold for minutes).
    try:
        result = await anyio.to_thread.run_sync(runner.run)
    finally:
        st.meters.forget(tenant_id, slug)  # usage queries here read its complete run at once
    return {"meter": slug, **asdict(result)}


def _iso_ms(ms: int) -> str | None:
    return _iso(from_epoch_ms(ms)) if ms > 0 else None


def run_json(r: RunRecord, visible: str | None, now_ms: int, lease_ms: int) -> dict[str, Any]:
    state = r.state
    if state == RUNNING and now_ms - r.heartbeat_ms >= lease_ms:
        state = "interrupted"  # its holder is gone: the next backfill resumes it
    return {
        "run_id": r.run_id,
        "state": state,
        "visible": r.run_id == visible,
        "events_total": r.events_total,
        "events_scanned": r.events_scanned,
        "events_matched": r.events_matched,
        "value_problems": r.value_problems,
        "windows": r.windows,
        "chunks": r.chunks,
        "error": r.error or None,
        "started_at": _iso_ms(r.started_ms),
        "heartbeat_at": _iso_ms(r.heartbeat_ms),
        "finished_at": _iso_ms(r.finished_ms) if r.state == COMPLETE else None,
    }


async def backfill_runs(st: AppState, tenant_id: str, slug: str) -> dict[str, Any]:
    meter: Meter = await st.run(st.repo.get_meter, tenant_id, slug)
    store = BackfillStore(st.store)
    runs: list[RunRecord] = await st.run(store.list_runs, tenant_id, meter.id)
    visible: str | None = await st.run(store.visible_run, tenant_id, meter.id)
    now = time.time_ns() // 1_000_000
    lease_ms = int(st.settings.backfill_lease_s * 1000)
    return {
        "meter": slug,
        "visible_run": visible,
        "data": [run_json(r, visible, now, lease_ms) for r in runs],
    }


_CREATED = ("post", "/v1/meters", 201)
for _name, _method, _path in (
    ("GetMeter", "get", "/v1/meters/{slug}"),
    ("DeleteMeter", "delete", "/v1/meters/{slug}"),
    ("MeterUsage", "get", "/v1/meters/{slug}/usage"),
    ("BackfillMeter", "post", "/v1/meters/{slug}/backfill"),
    ("BackfillRuns", "get", "/v1/meters/{slug}/backfill"),
    ("OpenMeterMeter", "get", "/api/v1/meters/{slug}"),
    ("OpenMeterQuery", "get", "/api/v1/meters/{slug}/query"),
    ("OpenMeterQueryPost", "post", "/api/v1/meters/{slug}/query"),
):
    link(_CREATED, _name, _method, _path, {"slug": "$response.body#/slug"})
