"""Webhook endpoints, the delivery log and per-customer usage thresholds (``billing.webhooks``).
See docs/invoicing.md (webhooks)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from api.auth import current_tenant
from api.billing_state import billing
from api.catalog import _body, _ok
from api.state import AppState, get_state
from schemas.billing import ThresholdIn, WebhookEndpointIn

router = APIRouter()


@router.post("/v1/webhooks/endpoints", status_code=201, tags=["webhooks"])
async def create_endpoint(
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    req = await _body(request, WebhookEndpointIn, "webhook endpoint")
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.create_endpoint, tenant_id, req), 201)


@router.get("/v1/webhooks/endpoints", tags=["webhooks"])
async def list_endpoints(
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    return _ok(await st.run(billing(request, st).webhooks.list_endpoints, tenant_id))


@router.delete("/v1/webhooks/endpoints/{endpoint_id}", tags=["webhooks"])
async def delete_endpoint(
    endpoint_id: str,
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.disable_endpoint, tenant_id, endpoint_id))


@router.post("/v1/webhooks/endpoints/{endpoint_id}/rotate-secret", tags=["webhooks"])
async def rotate_secret(
    endpoint_id: str,
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.rotate_secret, tenant_id, endpoint_id))


@router.get("/v1/webhooks/deliveries", tags=["webhooks"])
async def list_deliveries(
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    svc = billing(request, st).webhooks
    ep = request.query_params.get("endpoint_id") or None
    return _ok(await st.run(svc.deliveries, tenant_id, ep))


@router.get("/v1/webhooks/deliveries/{delivery_id}", tags=["webhooks"])
async def get_delivery(
    delivery_id: str,
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.delivery, tenant_id, delivery_id))


@router.post("/v1/customers/{customer_id}/thresholds", status_code=201, tags=["webhooks"])
async def add_threshold(
    customer_id: str,
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    req = await _body(request, ThresholdIn, "threshold")
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.add_threshold, tenant_id, customer_id, req), 201)


@router.get("/v1/customers/{customer_id}/thresholds", tags=["webhooks"])
async def list_thresholds(
    customer_id: str,
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.list_thresholds, tenant_id, customer_id))


@router.delete("/v1/customers/{customer_id}/thresholds/{threshold_id}", tags=["webhooks"])
async def delete_threshold(
    customer_id: str,
    threshold_id: str,
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.delete_threshold, tenant_id, customer_id, threshold_id))
