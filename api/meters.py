"""Meter endpoints: native CRUD under /v1/meters, OpenMeter read forms under /api/v1/meters."""

from __future__ import annotations

from typing import Any

import orjson
import pydantic
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from api.auth import current_tenant
from api.errors import json_response
from api.ingest import read_body
from api.ingest_parse import load_json
from api.state import AppState, get_state
from schemas.meters import Meter, MeterSpec
from schemas.timeutil import to_ms
from tally.errors import ValidationError

router = APIRouter()

MAX_METER_BODY = 64 * 1024


def parse_meter_spec(raw: bytes) -> MeterSpec:
    """Validate a MeterSpec JSON body; 400 naming every bad field."""
    doc = load_json(raw)
    if not isinstance(doc, dict):
        raise ValidationError(
            "a meter must be a JSON object",
            details=[{"field": "body", "message": "expected a JSON object"}],
        )
    try:
        return MeterSpec.model_validate(doc)
    except pydantic.ValidationError as exc:
        raise ValidationError.from_pydantic(exc, "invalid meter") from None


def _iso(dt: Any) -> str:
    return str(to_ms(dt).isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def meter_native(m: Meter) -> dict[str, Any]:
    body: dict[str, Any] = m.model_dump(mode="json", by_alias=False)
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


@router.post("/v1/meters", status_code=201, tags=["meters"])
async def create_meter(
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    spec = parse_meter_spec(await read_body(request, MAX_METER_BODY))
    meter: Meter = await st.run(st.repo.create_meter, tenant_id, spec)
    return json_response(201, meter_native(meter))


@router.get("/v1/meters", tags=["meters"])
async def list_meters(
    tenant_id: str = Depends(current_tenant), st: AppState = Depends(get_state)
) -> Response:
    meters: list[Meter] = await st.run(st.repo.list_meters, tenant_id)
    return json_response(200, {"data": [meter_native(m) for m in meters]})


@router.get("/v1/meters/{slug}", tags=["meters"])
async def get_meter(
    slug: str, tenant_id: str = Depends(current_tenant), st: AppState = Depends(get_state)
) -> Response:
    meter: Meter = await st.run(st.repo.get_meter, tenant_id, slug)
    return json_response(200, meter_native(meter))


@router.delete("/v1/meters/{slug}", status_code=204, tags=["meters"])
async def delete_meter(
    slug: str, tenant_id: str = Depends(current_tenant), st: AppState = Depends(get_state)
) -> Response:
    await st.run(st.repo.get_meter, tenant_id, slug)  # 404 naming the slug if absent
    await st.run(st.repo.delete_meter, tenant_id, slug)
    return Response(status_code=204)


@router.get("/api/v1/meters", tags=["openmeter"])
async def om_list_meters(
    tenant_id: str = Depends(current_tenant), st: AppState = Depends(get_state)
) -> Response:
    meters: list[Meter] = await st.run(st.repo.list_meters, tenant_id)
    return Response(
        orjson.dumps([meter_openmeter(m) for m in meters]), media_type="application/json"
    )


@router.get("/api/v1/meters/{slug}", tags=["openmeter"])
async def om_get_meter(
    slug: str, tenant_id: str = Depends(current_tenant), st: AppState = Depends(get_state)
) -> Response:
    meter: Meter = await st.run(st.repo.get_meter, tenant_id, slug)
    return json_response(200, meter_openmeter(meter))


@router.post("/v1/meters/{slug}/backfill", tags=["meters"])
async def backfill_meter(
    slug: str, tenant_id: str = Depends(current_tenant), st: AppState = Depends(get_state)
) -> Response:
    """Apply the meter to the events stored before it existed (idempotent: replaces old runs)."""
    return json_response(200, await run_backfill(st, tenant_id, slug))


async def run_backfill(st: AppState, tenant_id: str, slug: str) -> dict[str, Any]:
    from dataclasses import asdict

    from clickhouse.sink import ClickHouseSink
    from streams.backfill import backfill_meter as _backfill

    meter: Meter = await st.run(st.repo.get_meter, tenant_id, slug)
    result = await st.run(_backfill, ClickHouseSink(st.store), meter)
    return {"meter": slug, **asdict(result)}
