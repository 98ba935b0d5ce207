"""API keys of the calling tenant: ``/v1/api-keys`` (create, list, get, revoke, rotate).

Any valid key of a tenant manages that tenant's keys (there are no key scopes). A secret is shown
once, in the answer that created it; lists show the id, name, display prefix, status, creation,
expiry, revocation and last-use times. ``last_used_at`` is written in batches (at most
``counters_flush_s`` behind). Revoking works at once in this process and within
``auth_positive_ttl_s`` in every other one. The admin API has the same operations for any tenant
under ``/v1/admin/tenants/{tenant_id}/keys``.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request
from starlette.responses import Response

from api import answers as A
from api.auth import Tenant
from api.bodies import SMALL_BODY, parse_body
from api.errors import json_response
from api.openapi import doc, link, model
from api.state import AppState, State
from schemas.credentials import KeyIn, RotateIn
from schemas.timeutil import utc_now

router = APIRouter()


async def create_key(st: AppState, tenant_id: str, body: KeyIn) -> Response:
    creds = st.repo.credentials
    await st.run(st.repo.get_tenant, tenant_id)
    info, secret = await st.run(creds.create_api_key, tenant_id, body.name, body.expires_at)
    out = info.to_json(utc_now())
    out["api_key"] = secret
    return json_response(201, out)


async def list_keys(st: AppState, tenant_id: str) -> Response:
    keys = await st.run(st.repo.credentials.list_api_keys, tenant_id)
    now = utc_now()
    return json_response(200, {"data": [k.to_json(now) for k in keys]})


async def get_key(st: AppState, tenant_id: str, key_id: str) -> Response:
    key = await st.run(st.repo.credentials.get_api_key, tenant_id, key_id)
    return json_response(200, key.to_json(utc_now()))


async def revoke_key(st: AppState, tenant_id: str, key_id: str) -> Response:
    key = await st.run(st.repo.credentials.revoke_api_key, tenant_id, key_id)
    st.auth.forget(key_id=key.key_id)
    return json_response(200, key.to_json(utc_now()))


async def rotate_key(st: AppState, tenant_id: str, key_id: str, body: RotateIn) -> Response:
    new, secret, old = await st.run(
        st.repo.credentials.rotate_api_key,
        tenant_id,
        key_id,
        timedelta(seconds=body.overlap_s),
        body.name,
        body.expires_at,
    )
    st.auth.forget(key_id=old.key_id)  # its new expiry applies here at once
    now = utc_now()
    out = new.to_json(now)
    out["api_key"] = secret
    out["previous"] = old.to_json(now)
    return json_response(201, out)


@router.post(
    "/v1/api-keys",
    status_code=201,
    tags=["keys"],
    **doc(ok={201: A.API_KEY_CREATED}, body=model(KeyIn, "validation"), body_required=False),
)
async def create(request: Request, tenant_id: Tenant, st: State) -> Response:
    """Create a key for the calling tenant; the secret (``api_key``) is shown only here."""
    return await create_key(
        st, tenant_id, await parse_body(request, KeyIn, "key", limit=SMALL_BODY, optional=True)
    )


@router.get("/v1/api-keys", tags=["keys"], **doc(ok={200: A.data_of(A.API_KEY)}))
async def list_(tenant_id: Tenant, st: State) -> Response:
    """Every key of the calling tenant (active, expired, revoked); never a secret."""
    return await list_keys(st, tenant_id)


@router.get("/v1/api-keys/{key_id}", tags=["keys"], **doc(ok={200: A.API_KEY}))
async def get(key_id: str, tenant_id: Tenant, st: State) -> Response:
    """A key of the calling tenant, never its secret. A revoked key stays readable (``status:
    revoked``, ``revoked_at``) here and in the list: revoking stops it at once but keeps the
    record of which key could write when."""
    return await get_key(st, tenant_id, key_id)


@router.delete("/v1/api-keys/{key_id}", tags=["keys"], **doc(ok={200: A.API_KEY}))
async def revoke(key_id: str, tenant_id: Tenant, st: State) -> Response:
    """Revoke a key (idempotent); answers the key with its ``revoked_at``. The key stops
    authenticating at once; its record is kept (a later GET answers it as revoked)."""
    return await revoke_key(st, tenant_id, key_id)


@router.post(
    "/v1/api-keys/{key_id}/rotate",
    status_code=201,
    tags=["keys"],
    **doc(
        ok={201: A.API_KEY_ROTATED},
        body=model(RotateIn, "validation"),
        body_required=False,
        errors=(409,),
    ),
)
async def rotate(
    key_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    """A new key replacing ``key_id``, which keeps working for ``overlap_s`` (default 3600)."""
    body = await parse_body(request, RotateIn, "rotation", limit=SMALL_BODY, optional=True)
    return await rotate_key(st, tenant_id, key_id, body)


for _name, _method, _path in (
    ("GetKey", "get", "/v1/api-keys/{key_id}"),
    ("RevokeKey", "delete", "/v1/api-keys/{key_id}"),
    ("RotateKey", "post", "/v1/api-keys/{key_id}/rotate"),
):
    link(("post", "/v1/api-keys", 201), _name, _method, _path, {"key_id": "$response.body#/id"})
