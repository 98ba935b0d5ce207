"""Webhook endpoints, the delivery log and per-customer usage thresholds (``billing.webhooks``).
See docs/invoicing.md (webhooks)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from api.auth import Tenant
from api.billing_state import billing
from api.catalog import _body, _ok
from api.openapi import doc, link, model, model_list, query
from api.state import State
from schemas.billing import Delivery, Threshold, ThresholdIn, WebhookEndpoint, WebhookEndpointIn

router = APIRouter()


@router.post(
    "/v1/webhooks/endpoints",
    status_code=201,
    tags=["webhooks"],
    **doc(ok={201: model(WebhookEndpoint)}, body=model(WebhookEndpointIn, "validation")),
)
async def create_endpoint(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    req = await _body(request, WebhookEndpointIn, "webhook endpoint")
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.create_endpoint, tenant_id, req), 201)


@router.get(
    "/v1/webhooks/endpoints",
    tags=["webhooks"],
    **doc(ok={200: model_list(WebhookEndpoint)}),
)
async def list_endpoints(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    return _ok(await st.run(billing(request, st).webhooks.list_endpoints, tenant_id))


@router.delete(
    "/v1/webhooks/endpoints/{endpoint_id}",
    tags=["webhooks"],
    **doc(ok={200: model(WebhookEndpoint)}),
)
async def delete_endpoint(
    endpoint_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.disable_endpoint, tenant_id, endpoint_id))


@router.post(
    "/v1/webhooks/endpoints/{endpoint_id}/rotate-secret",
    tags=["webhooks"],
    **doc(ok={200: model(WebhookEndpoint)}, errors=(409,)),
)
async def rotate_secret(
    endpoint_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.rotate_secret, tenant_id, endpoint_id))


@router.get(
    "/v1/webhooks/deliveries",
    tags=["webhooks"],
    **doc(
        ok={200: model_list(Delivery)},
        params=[query("endpoint_id", {"type": "string"}, "only this endpoint's deliveries")],
    ),
)
async def list_deliveries(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).webhooks
    ep = request.query_params.get("endpoint_id") or None
    return _ok(await st.run(svc.deliveries, tenant_id, ep))


@router.get(
    "/v1/webhooks/deliveries/{delivery_id}",
    tags=["webhooks"],
    **doc(ok={200: model(Delivery)}),
)
async def get_delivery(
    delivery_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.delivery, tenant_id, delivery_id))


@router.post(
    "/v1/customers/{customer_id}/thresholds",
    status_code=201,
    tags=["webhooks"],
    **doc(ok={201: model(Threshold)}, body=model(ThresholdIn, "validation")),
)
async def add_threshold(
    customer_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    req = await _body(request, ThresholdIn, "threshold")
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.add_threshold, tenant_id, customer_id, req), 201)


@router.get(
    "/v1/customers/{customer_id}/thresholds",
    tags=["webhooks"],
    **doc(ok={200: model_list(Threshold)}),
)
async def list_thresholds(
    customer_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.list_thresholds, tenant_id, customer_id))


@router.delete(
    "/v1/customers/{customer_id}/thresholds/{threshold_id}",
    tags=["webhooks"],
    **doc(ok={200: model(Threshold)}),
)
async def delete_threshold(
    customer_id: str,
    threshold_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).webhooks
    return _ok(await st.run(svc.delete_threshold, tenant_id, customer_id, threshold_id))


_ENDPOINT = ("post", "/v1/webhooks/endpoints", 201)
for _name, _method, _path in (
    ("DisableEndpoint", "delete", "/v1/webhooks/endpoints/{endpoint_id}"),
    ("RotateSecret", "post", "/v1/webhooks/endpoints/{endpoint_id}/rotate-secret"),
):
    link(_ENDPOINT, _name, _method, _path, {"endpoint_id": "$response.body#/id"})
link(
    ("post", "/v1/customers/{customer_id}/thresholds", 201),
    "DeleteThreshold",
    "delete",
    "/v1/customers/{customer_id}/thresholds/{threshold_id}",
    {"customer_id": "$response.body#/customer_id", "threshold_id": "$response.body#/id"},
)
