"""Catalog and rating endpoints: plans (with versions), customers, subscriptions, the upcoming
invoice and the rating preview. The use-cases live in ``billing.catalog.Catalog`` (one per app,
created on first use, see ``api.billing_state``); this module only parses, authenticates and
answers.
Every route is tenant-scoped through ``api.auth.current_tenant``. See docs/catalog.md.
"""

from __future__ import annotations

from typing import Any, TypeVar

import pydantic
from fastapi import APIRouter, Request
from starlette.responses import Response

from api.auth import Tenant
from api.bodies import parse_body
from api.errors import json_response
from api.openapi import LIMIT_PARAM, OFFSET_PARAM, doc, int_query, link, model, model_list, query
from api.state import AppState, State
from schemas.catalog import (
    ActionIn,
    ChangePlanIn,
    Customer,
    CustomerIn,
    CustomerPatch,
    PlanDraft,
    PlanVersion,
    PreviewIn,
    PreviewOut,
    Subscription,
    SubscriptionIn,
    UpcomingInvoice,
)
from schemas.pricing import PlanSpec
from schemas.timeutil import utc_now
from tally.errors import ValidationError

router = APIRouter()

MAX_BODY = 256 * 1024
MAX_LIST = 1000
M = TypeVar("M", bound=pydantic.BaseModel)


def _catalog(request: Request, st: AppState) -> Any:
    from api.billing_state import billing

    return billing(request, st).catalog


async def _body(request: Request, model: type[M], what: str) -> M:
    """A required JSON object body (at most ``MAX_BODY``) as ``model``; 400 naming every bad
    field."""
    return await parse_body(request, model, what, limit=MAX_BODY)


def _ok(model: Any, status: int = 200) -> Response:
    if isinstance(model, list):
        return json_response(status, {"data": [m.model_dump(mode="json") for m in model]})
    return json_response(status, model.model_dump(mode="json"))


def _path_version(version: str) -> int:
    try:
        n = int(version)
    except ValueError:
        n = 0
    if n < 1:
        raise ValidationError(
            "version must be a positive integer",
            details=[{"field": "version", "message": "expected an integer >= 1"}],
        )
    return n


# --- rating preview ---------------------------------------------------------------------------


@router.post(
    "/v1/rating/preview",
    tags=["rating"],
    **doc(ok={200: model(PreviewOut)}, body=model(PreviewIn, "validation"), errors=(404,)),
)
async def preview(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    req = await _body(request, PreviewIn, "preview request")
    cat = _catalog(request, st)
    if req.plan_code is not None:
        return _ok(await st.run(cat.preview, tenant_id, req))
    return _ok(cat.preview(tenant_id, req))  # pure: no store access


# --- plans ------------------------------------------------------------------------------------


@router.post(
    "/v1/plans",
    status_code=201,
    tags=["catalog"],
    **doc(ok={201: model(PlanVersion)}, body=model(PlanSpec, "validation"), errors=(409,)),
)
async def create_plan(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    spec = await _body(request, PlanSpec, "plan")
    plan = await st.run(_catalog(request, st).create_plan, tenant_id, spec)
    return _ok(plan, 201)


@router.get(
    "/v1/plans",
    tags=["catalog"],
    **doc(ok={200: model_list(PlanVersion)}),
)
async def list_plans(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    return _ok(await st.run(_catalog(request, st).list_plans, tenant_id))


@router.get(
    "/v1/plans/{code}",
    tags=["catalog"],
    **doc(ok={200: model(PlanVersion)}),
)
async def get_plan(
    code: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    return _ok(await st.run(_catalog(request, st).get_plan, tenant_id, code))


@router.post(
    "/v1/plans/{code}/versions",
    status_code=201,
    tags=["catalog"],
    **doc(ok={201: model(PlanVersion)}, body=model(PlanDraft, "validation"), errors=(409,)),
)
async def publish_version(
    code: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    draft = await _body(request, PlanDraft, "plan version")
    plan = await st.run(_catalog(request, st).publish_version, tenant_id, code, draft)
    return _ok(plan, 201)


@router.get(
    "/v1/plans/{code}/versions",
    tags=["catalog"],
    **doc(ok={200: model_list(PlanVersion)}),
)
async def list_versions(
    code: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    return _ok(await st.run(_catalog(request, st).list_versions, tenant_id, code))


@router.get(
    "/v1/plans/{code}/versions/{version}",
    tags=["catalog"],
    **doc(
        ok={200: model(PlanVersion)},
        params=[
            {
                "name": "version",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": "^0*[1-9][0-9]{0,17}$"},
                "description": "a version number (an integer >= 1)",
            }
        ],
        errors=(400,),
    ),
)
async def get_version(
    code: str,
    version: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    n = _path_version(version)
    return _ok(await st.run(_catalog(request, st).get_plan, tenant_id, code, n))


# --- customers --------------------------------------------------------------------------------


@router.post(
    "/v1/customers",
    status_code=201,
    tags=["catalog"],
    **doc(ok={201: model(Customer)}, body=model(CustomerIn, "validation"), errors=(409,)),
)
async def create_customer(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    data = await _body(request, CustomerIn, "customer")
    return _ok(await st.run(_catalog(request, st).create_customer, tenant_id, data), 201)


@router.get(
    "/v1/customers",
    tags=["catalog"],
    **doc(
        ok={200: model_list(Customer)},
        params=[
            query("limit", LIMIT_PARAM, "at most this many (default 100)"),
            query("offset", OFFSET_PARAM, "skip this many (default 0)"),
        ],
    ),
)
async def list_customers(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    limit = int_query(request, "limit", 100, 1, MAX_LIST)
    offset = int_query(request, "offset", 0, 0, 10**9)
    cat = _catalog(request, st)
    return _ok(await st.run(cat.list_customers, tenant_id, limit, offset))


@router.get(
    "/v1/customers/{external_id}",
    tags=["catalog"],
    **doc(ok={200: model(Customer)}),
)
async def get_customer(
    external_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    return _ok(await st.run(_catalog(request, st).get_customer, tenant_id, external_id))


@router.patch(
    "/v1/customers/{external_id}",
    tags=["catalog"],
    **doc(ok={200: model(Customer)}, body=model(CustomerPatch, "validation"), errors=(409,)),
)
async def update_customer(
    external_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    patch = await _body(request, CustomerPatch, "customer update")
    cat = _catalog(request, st)
    return _ok(await st.run(cat.update_customer, tenant_id, external_id, patch))


@router.get(
    "/v1/customers/{external_id}/upcoming-invoice",
    tags=["catalog"],
    **doc(ok={200: model(UpcomingInvoice)}),
)
async def upcoming_invoice(
    external_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    from api.billing_state import billing

    inv = billing(request, st).invoicing
    return _ok(await st.run(inv.upcoming_invoice, tenant_id, external_id, utc_now()))


# --- subscriptions ----------------------------------------------------------------------------


@router.post(
    "/v1/subscriptions",
    status_code=201,
    tags=["catalog"],
    **doc(
        ok={201: model(Subscription)}, body=model(SubscriptionIn, "validation"), errors=(404, 409)
    ),
)
async def create_subscription(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    req = await _body(request, SubscriptionIn, "subscription")
    cat = _catalog(request, st)
    return _ok(await st.run(cat.create_subscription, tenant_id, req, utc_now()), 201)


@router.get(
    "/v1/subscriptions",
    tags=["catalog"],
    **doc(
        ok={200: model_list(Subscription)},
        params=[query("customer_id", {"type": "string"}, "only this customer's subscriptions")],
    ),
)
async def list_subscriptions(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    customer = request.query_params.get("customer_id")
    cat = _catalog(request, st)
    return _ok(await st.run(cat.list_subscriptions, tenant_id, customer))


@router.get(
    "/v1/subscriptions/{sub_id}",
    tags=["catalog"],
    **doc(ok={200: model(Subscription)}, errors=(409,)),
)
async def get_subscription(
    sub_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    cat = _catalog(request, st)
    return _ok(await st.run(cat.current_subscription, tenant_id, sub_id, utc_now()))


@router.post(
    "/v1/subscriptions/{sub_id}/actions",
    tags=["catalog"],
    **doc(ok={200: model(Subscription)}, body=model(ActionIn, "validation"), errors=(409,)),
)
async def subscription_action(
    sub_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    req = await _body(request, ActionIn, "subscription action")
    cat = _catalog(request, st)
    return _ok(await st.run(cat.subscription_action, tenant_id, sub_id, req, utc_now()))


@router.post(
    "/v1/subscriptions/{sub_id}/change-plan",
    tags=["catalog"],
    **doc(ok={200: model(Subscription)}, body=model(ChangePlanIn, "validation"), errors=(409,)),
)
async def change_plan(
    sub_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    req = await _body(request, ChangePlanIn, "plan change")
    cat = _catalog(request, st)
    return _ok(await st.run(cat.change_subscription_plan, tenant_id, sub_id, req, utc_now()))


_PLAN = ("post", "/v1/plans", 201)
for _name, _method, _path in (
    ("GetPlan", "get", "/v1/plans/{code}"),
    ("PublishVersion", "post", "/v1/plans/{code}/versions"),
    ("ListVersions", "get", "/v1/plans/{code}/versions"),
):
    link(_PLAN, _name, _method, _path, {"code": "$response.body#/code"})
link(
    _PLAN,
    "GetVersion",
    "get",
    "/v1/plans/{code}/versions/{version}",
    {"code": "$response.body#/code", "version": "$response.body#/version"},
)
_CUSTOMER = ("post", "/v1/customers", 201)
for _name, _method, _path, _param in (
    ("GetCustomer", "get", "/v1/customers/{external_id}", "external_id"),
    ("UpdateCustomer", "patch", "/v1/customers/{external_id}", "external_id"),
    ("UpcomingInvoice", "get", "/v1/customers/{external_id}/upcoming-invoice", "external_id"),
    ("AddDiscount", "post", "/v1/customers/{customer_id}/discounts", "customer_id"),
    ("ListDiscounts", "get", "/v1/customers/{customer_id}/discounts", "customer_id"),
    ("AddThreshold", "post", "/v1/customers/{customer_id}/thresholds", "customer_id"),
    ("ListThresholds", "get", "/v1/customers/{customer_id}/thresholds", "customer_id"),
):
    link(_CUSTOMER, _name, _method, _path, {_param: "$response.body#/external_id"})
_SUB = ("post", "/v1/subscriptions", 201)
for _name, _method, _path in (
    ("GetSubscription", "get", "/v1/subscriptions/{sub_id}"),
    ("SubscriptionAction", "post", "/v1/subscriptions/{sub_id}/actions"),
    ("ChangePlan", "post", "/v1/subscriptions/{sub_id}/change-plan"),
):
    link(_SUB, _name, _method, _path, {"sub_id": "$response.body#/id"})
