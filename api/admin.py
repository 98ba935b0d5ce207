"""Admin endpoints (``Authorization: Bearer <admin token>``): tenants, their API keys and limits,
and admin tokens.

A secret (API key or admin token) is shown exactly once, in the answer that created it; only its
hash is stored. Key operations are those of ``/v1/api-keys`` (``api.keys``) for any tenant.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from api import answers as A
from api.auth import require_admin
from api.bodies import SMALL_BODY, parse_body, read_body
from api.errors import json_response
from api.ingest_parse import load_json
from api.keys import create_key, get_key, list_keys, revoke_key, rotate_key
from api.limits import effective_limits
from api.openapi import doc, link, model
from api.state import AppState, State
from clickhouse.limits import LimitOverrides
from schemas.credentials import AdminTokenIn, KeyIn, LimitsIn, RotateIn
from schemas.timeutil import to_ms
from tally.errors import Conflict, NotFound, ValidationError

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


async def _tenant(st: AppState, tenant_id: str) -> Any:
    try:
        return await st.run(st.repo.get_tenant, tenant_id)
    except NotFound:
        raise NotFound(f"tenant {tenant_id!r} not found", field="tenant_id") from None


@router.post(
    "/v1/admin/tenants",
    status_code=201,
    tags=["admin"],
    **doc(ok={201: A.TENANT_CREATED}, body=A.TENANT_IN),
)
async def create_tenant(request: Request, st: State) -> Response:
    doc = load_json(await read_body(request, SMALL_BODY))
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


@router.get("/v1/admin/tenants", tags=["admin"], **doc(ok={200: A.data_of(A.TENANT)}))
async def list_tenants(st: State) -> Response:
    tenants = await st.run(st.repo.list_tenants)
    return json_response(200, {"data": [tenant_json(t) for t in tenants]})


# --- a tenant's API keys ----------------------------------------------------------------------


@router.post(
    "/v1/admin/tenants/{tenant_id}/keys",
    status_code=201,
    tags=["admin"],
    **doc(ok={201: A.API_KEY_CREATED}, body=model(KeyIn, "validation"), body_required=False),
)
async def create_key_admin(tenant_id: str, request: Request, st: State) -> Response:
    """A new key for the tenant (body optional: ``{name, expires_at}``); secret in ``api_key``."""
    await _tenant(st, tenant_id)
    return await create_key(
        st, tenant_id, await parse_body(request, KeyIn, "key", limit=SMALL_BODY, optional=True)
    )


@router.get(
    "/v1/admin/tenants/{tenant_id}/keys", tags=["admin"], **doc(ok={200: A.data_of(A.API_KEY)})
)
async def list_keys_admin(tenant_id: str, st: State) -> Response:
    await _tenant(st, tenant_id)
    return await list_keys(st, tenant_id)


@router.get(
    "/v1/admin/tenants/{tenant_id}/keys/{key_id}", tags=["admin"], **doc(ok={200: A.API_KEY})
)
async def get_key_admin(tenant_id: str, key_id: str, st: State) -> Response:
    """A key of the tenant, never its secret; a revoked key stays readable as ``revoked``."""
    return await get_key(st, tenant_id, key_id)


@router.delete(
    "/v1/admin/tenants/{tenant_id}/keys/{key_id}", tags=["admin"], **doc(ok={200: A.API_KEY})
)
async def revoke_key_admin(tenant_id: str, key_id: str, st: State) -> Response:
    return await revoke_key(st, tenant_id, key_id)


@router.post(
    "/v1/admin/tenants/{tenant_id}/keys/{key_id}/rotate",
    status_code=201,
    tags=["admin"],
    **doc(
        ok={201: A.API_KEY_ROTATED},
        body=model(RotateIn, "validation"),
        body_required=False,
        errors=(409,),
    ),
)
async def rotate_key_admin(tenant_id: str, key_id: str, request: Request, st: State) -> Response:
    body = await parse_body(request, RotateIn, "rotation", limit=SMALL_BODY, optional=True)
    return await rotate_key(st, tenant_id, key_id, body)


# --- a tenant's limits ------------------------------------------------------------------------


async def _limits_body(st: AppState, tenant_id: str) -> dict[str, Any]:
    overrides: LimitOverrides = await st.run(st.limiter.repo.get, tenant_id)
    eff = effective_limits(st.settings, overrides)
    return {
        "tenant_id": tenant_id,
        "overrides": overrides.to_json(),
        "effective": eff.to_json(),
        "api_replicas": st.settings.api_replicas,
    }


@router.get("/v1/admin/tenants/{tenant_id}/limits", tags=["admin"], **doc(ok={200: A.LIMITS}))
async def get_limits(tenant_id: str, st: State) -> Response:
    """The tenant's overrides (null = default) and the limits in effect (0 = unlimited)."""
    await _tenant(st, tenant_id)
    return json_response(200, await _limits_body(st, tenant_id))


@router.put(
    "/v1/admin/tenants/{tenant_id}/limits",
    tags=["admin"],
    **doc(ok={200: A.LIMITS}, body=model(LimitsIn, "validation"), body_required=False),
)
async def put_limits(tenant_id: str, request: Request, st: State) -> Response:
    """Replace the tenant's overrides: ``{requests_per_second, events_per_second,
    max_batch_events, monthly_events}``, each null/absent (default), 0 (unlimited) or a limit.
    Takes effect at once in this process, within ``limits_cache_ttl_s`` in the others."""
    await _tenant(st, tenant_id)
    body = await parse_body(request, LimitsIn, "limits", limit=SMALL_BODY, optional=True)
    overrides = LimitOverrides(**body.model_dump())
    await st.run(st.limiter.repo.put, tenant_id, overrides)
    st.limiter.invalidate(tenant_id)
    return json_response(200, await _limits_body(st, tenant_id))


# --- admin tokens -----------------------------------------------------------------------------


@router.post(
    "/v1/admin/tokens",
    status_code=201,
    tags=["admin"],
    **doc(
        ok={201: A.ADMIN_TOKEN_CREATED},
        body=model(AdminTokenIn, "validation"),
        body_required=False,
    ),
)
async def create_admin_token(request: Request, st: State) -> Response:
    """A new admin token (body optional: ``{name}``); the secret is in ``admin_token``, once."""
    body = await parse_body(request, AdminTokenIn, "admin token", limit=SMALL_BODY, optional=True)
    info, token = await st.run(st.repo.credentials.create_admin_token, body.name)
    out = info.to_json()
    out["admin_token"] = token
    return json_response(201, out)


@router.get("/v1/admin/tokens", tags=["admin"], **doc(ok={200: A.data_of(A.ADMIN_TOKEN)}))
async def list_admin_tokens(st: State) -> Response:
    tokens = await st.run(st.repo.credentials.list_admin_tokens)
    return json_response(200, {"data": [t.to_json() for t in tokens]})


@router.delete(
    "/v1/admin/tokens/{token_id}", tags=["admin"], **doc(ok={200: A.ADMIN_TOKEN}, errors=(409,))
)
async def revoke_admin_token(token_id: str, st: State) -> Response:
    """Revoke an admin token (idempotent). The last active one cannot be revoked (409)."""
    creds = st.repo.credentials
    tokens = await st.run(creds.list_admin_tokens)
    active = [t for t in tokens if t.revoked_at is None]
    if [t.token_id for t in active] == [token_id]:
        raise Conflict(
            "this is the last active admin token; create another one before revoking it",
            field="token_id",
        )
    info = await st.run(creds.revoke_admin_token, token_id)
    st.auth.forget(token_id=info.token_id)
    return json_response(200, info.to_json())


@router.post(
    "/v1/admin/tenants/{tenant_id}/meters/{slug}/backfill",
    tags=["admin"],
    **doc(ok={200: A.BACKFILL_RESULT}, errors=(400, 409)),
)
async def backfill(tenant_id: str, slug: str, st: State) -> Response:
    from api.meters import run_backfill

    return json_response(200, await run_backfill(st, tenant_id, slug))


@router.get(
    "/v1/admin/tenants/{tenant_id}/meters/{slug}/backfill",
    tags=["admin"],
    **doc(ok={200: A.BACKFILL_RUNS}),
)
async def backfill_status(tenant_id: str, slug: str, st: State) -> Response:
    from api.meters import backfill_runs

    return json_response(200, await backfill_runs(st, tenant_id, slug))


_TENANT = ("post", "/v1/admin/tenants", 201)
for _name, _method, _path in (
    ("CreateKey", "post", "/v1/admin/tenants/{tenant_id}/keys"),
    ("ListKeys", "get", "/v1/admin/tenants/{tenant_id}/keys"),
    ("GetLimits", "get", "/v1/admin/tenants/{tenant_id}/limits"),
    ("SetLimits", "put", "/v1/admin/tenants/{tenant_id}/limits"),
    ("RunInvoices", "post", "/v1/admin/tenants/{tenant_id}/invoices/run"),
):
    link(_TENANT, _name, _method, _path, {"tenant_id": "$response.body#/tenant_id"})
_KEY = ("post", "/v1/admin/tenants/{tenant_id}/keys", 201)
for _name, _method, _path in (
    ("GetKey", "get", "/v1/admin/tenants/{tenant_id}/keys/{key_id}"),
    ("RevokeKey", "delete", "/v1/admin/tenants/{tenant_id}/keys/{key_id}"),
    ("RotateKey", "post", "/v1/admin/tenants/{tenant_id}/keys/{key_id}/rotate"),
):
    link(
        _KEY,
        _name,
        _method,
        _path,
        {"tenant_id": "$response.body#/tenant_id", "key_id": "$response.body#/id"},
    )
link(
    ("post", "/v1/admin/tokens", 201),
    "RevokeToken",
    "delete",
    "/v1/admin/tokens/{token_id}",
    {"token_id": "$response.body#/id"},
)
