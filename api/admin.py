"""Admin endpoints (``Authorization: Bearer <admin token>``): tenants and API keys.

An API key is shown exactly once, in the answer that created it; only its hash is stored.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from api.auth import require_admin
from api.errors import json_response
from api.ingest import read_body
from api.ingest_parse import load_json
from api.state import AppState, get_state
from schemas.timeutil import to_ms
from tally.errors import NotFound, ValidationError

router = APIRouter(dependencies=[Depends(require_admin)])

MAX_NAME = 256


def tenant_json(t: Any) -> dict[str, Any]:
    if hasattr(t, "model_dump"):
        body: dict[str, Any] = t.model_dump(mode="json")
    elif hasattr(t, "__dataclass_fields__"):
        from dataclasses import asdict

        body = asdict(t)
    else:
        body = dict(t)
    created = body.get("created_at")
    if created is not None and not isinstance(created, str):
        body["created_at"] = to_ms(created).isoformat(timespec="milliseconds")
    return body


@router.post("/v1/admin/tenants", status_code=201, tags=["admin"])
async def create_tenant(request: Request, st: AppState = Depends(get_state)) -> Response:
    doc = load_json(await read_body(request, 16 * 1024))
    name = doc.get("name") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise ValidationError(
            f"name is required: a non-empty string of at most {MAX_NAME} characters",
            details=[{"field": "name", "message": "required non-empty string"}],
        )
    tenant, api_key = await st.run(st.repo.create_tenant, name.strip())
    body = tenant_json(tenant)
    body["api_key"] = api_key
    return json_response(201, body)


@router.get("/v1/admin/tenants", tags=["admin"])
async def list_tenants(st: AppState = Depends(get_state)) -> Response:
    tenants = await st.run(st.repo.list_tenants)
    return json_response(200, {"data": [tenant_json(t) for t in tenants]})


@router.post("/v1/admin/tenants/{tenant_id}/keys", status_code=201, tags=["admin"])
async def create_key(tenant_id: str, st: AppState = Depends(get_state)) -> Response:
    try:
        tenant = await st.run(st.repo.get_tenant, tenant_id)
    except NotFound:
        tenant = None
    if tenant is None:
        raise NotFound(
            f"tenant {tenant_id!r} not found",
            details=[{"field": "tenant_id", "message": "unknown tenant"}],
        )
    api_key = await st.run(st.repo.create_api_key, tenant_id)
    return json_response(201, {"tenant_id": tenant_id, "api_key": api_key})


@router.post("/v1/admin/tenants/{tenant_id}/meters/{slug}/backfill", tags=["admin"])
async def backfill(tenant_id: str, slug: str, st: AppState = Depends(get_state)) -> Response:
    from api.meters import run_backfill

    return json_response(200, await run_backfill(st, tenant_id, slug))


@router.get("/v1/admin/tenants/{tenant_id}/meters/{slug}/backfill", tags=["admin"])
async def backfill_status(tenant_id: str, slug: str, st: AppState = Depends(get_state)) -> Response:
    from api.meters import backfill_runs

    return json_response(200, await backfill_runs(st, tenant_id, slug))
