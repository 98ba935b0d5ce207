"""One builder per API endpoint: the request and how to read its answer (``Call``).

To cover a new endpoint: add a builder here, and a one-line method to the resource classes of
``client.py`` (sync) and ``aio.py`` (async) that passes it to ``_call``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from schemas.catalog import (
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
from schemas.meters import Meter, MeterSpec
from schemas.pricing import PlanSpec
from schemas.segment import SegmentConfig, SegmentConfigIn, WebhookSecretIn, WebhookSecretOut
from schemas.usage import UsageResult
from tally_client._core import Call, body_of, model, model_list, nothing, seg, usage_params

Body = Mapping[str, Any]

# --- meters and usage --------------------------------------------------------------------------


def create_meter(spec: MeterSpec | Body) -> Call[Meter]:
    return Call("POST", "/v1/meters", model(Meter), body=body_of(spec), idempotent=False)


def list_meters() -> Call[list[Meter]]:
    return Call("GET", "/v1/meters", model_list(Meter))


def get_meter(slug: str) -> Call[Meter]:
    return Call("GET", f"/v1/meters/{seg(slug)}", model(Meter))


def delete_meter(slug: str) -> Call[None]:
    return Call("DELETE", f"/v1/meters/{seg(slug)}", nothing)


def usage(
    slug: str,
    *,
    from_: datetime | str | None = None,
    to: datetime | str | None = None,
    window: str | None = None,
    tz: str | None = None,
    customers: Iterable[str] = (),
    group_by: Iterable[str] = (),
    filters: Mapping[str, str | Iterable[str]] | None = None,
) -> Call[UsageResult]:
    params = usage_params(from_, to, window, tz, customers, group_by, filters)
    return Call("GET", f"/v1/meters/{seg(slug)}/usage", model(UsageResult), params=params)


# --- plans -------------------------------------------------------------------------------------


def create_plan(spec: PlanSpec | Body) -> Call[PlanVersion]:
    return Call("POST", "/v1/plans", model(PlanVersion), body=body_of(spec), idempotent=False)


def list_plans() -> Call[list[PlanVersion]]:
    return Call("GET", "/v1/plans", model_list(PlanVersion))


def get_plan(code: str, version: int | None = None) -> Call[PlanVersion]:
    path = f"/v1/plans/{seg(code)}" + (f"/versions/{int(version)}" if version else "")
    return Call("GET", path, model(PlanVersion))


def publish_plan_version(code: str, draft: PlanDraft | Body) -> Call[PlanVersion]:
    return Call(
        "POST",
        f"/v1/plans/{seg(code)}/versions",
        model(PlanVersion),
        body=body_of(draft),
        idempotent=False,
    )


def list_plan_versions(code: str) -> Call[list[PlanVersion]]:
    return Call("GET", f"/v1/plans/{seg(code)}/versions", model_list(PlanVersion))


# --- customers and invoices --------------------------------------------------------------------


def create_customer(customer: CustomerIn | Body) -> Call[Customer]:
    return Call("POST", "/v1/customers", model(Customer), body=body_of(customer), idempotent=False)


def get_customer(external_id: str) -> Call[Customer]:
    return Call("GET", f"/v1/customers/{seg(external_id)}", model(Customer))


def list_customers(limit: int = 100, offset: int = 0) -> Call[list[Customer]]:
    params = [("limit", str(limit)), ("offset", str(offset))]
    return Call("GET", "/v1/customers", model_list(Customer), params=params)


def update_customer(external_id: str, patch: CustomerPatch | Body) -> Call[Customer]:
    # A PATCH sets absolute values: sending it twice gives the same customer.
    return Call("PATCH", f"/v1/customers/{seg(external_id)}", model(Customer), body=body_of(patch))


def upcoming_invoice(customer_id: str) -> Call[UpcomingInvoice]:
    return Call("GET", f"/v1/customers/{seg(customer_id)}/upcoming-invoice", model(UpcomingInvoice))


# --- subscriptions -----------------------------------------------------------------------------


def create_subscription(sub: SubscriptionIn | Body) -> Call[Subscription]:
    return Call(
        "POST", "/v1/subscriptions", model(Subscription), body=body_of(sub), idempotent=False
    )


def get_subscription(sub_id: str) -> Call[Subscription]:
    return Call("GET", f"/v1/subscriptions/{seg(sub_id)}", model(Subscription))


def list_subscriptions(customer_id: str | None = None) -> Call[list[Subscription]]:
    params = [("customer_id", customer_id)] if customer_id else []
    return Call("GET", "/v1/subscriptions", model_list(Subscription), params=params)


def subscription_action(sub_id: str, action: str, at: str = "now") -> Call[Subscription]:
    return Call(
        "POST",
        f"/v1/subscriptions/{seg(sub_id)}/actions",
        model(Subscription),
        body={"action": action, "at": at},
        idempotent=False,
    )


def change_plan(
    sub_id: str, plan_code: str, version: int | None = None, timing: str | None = None
) -> Call[Subscription]:
    body: dict[str, Any] = {"plan_code": plan_code}
    if version is not None:
        body["version"] = version
    if timing is not None:
        body["timing"] = timing
    return Call(
        "POST",
        f"/v1/subscriptions/{seg(sub_id)}/change-plan",
        model(Subscription),
        body=body,
        idempotent=False,
    )


# --- rating ------------------------------------------------------------------------------------


def preview(req: PreviewIn | Body) -> Call[PreviewOut]:
    # Nothing is stored: safe to resend.
    return Call("POST", "/v1/rating/preview", model(PreviewOut), body=body_of(req))


# --- Segment sources ---------------------------------------------------------------------------


def segment_config() -> Call[SegmentConfig]:
    return Call("GET", "/v1/segment/config", model(SegmentConfig))


def set_segment_config(cfg: SegmentConfigIn | Body) -> Call[SegmentConfig]:
    return Call("PUT", "/v1/segment/config", model(SegmentConfig), body=body_of(cfg))


def set_webhook_secret(req: WebhookSecretIn | Body | None = None) -> Call[WebhookSecretOut]:
    return Call(
        "POST",
        "/v1/segment/webhook-secret",
        model(WebhookSecretOut),
        body=body_of(req) if req is not None else {},
        idempotent=False,
    )
