"""Plans, customers and subscriptions for the catalog unit tests (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from rating.subscriptions import new_subscription
from schemas.catalog import Customer, PlanVersion, Subscription, SubscriptionIn

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def plan(
    code: str,
    fixed: str | None = None,
    *,
    version: int = 1,
    currency: str = "USD",
    interval: str = "month",
    charges: list[dict[str, Any]] | None = None,
) -> PlanVersion:
    all_charges: list[dict[str, Any]] = []
    if fixed is not None:
        all_charges.append(
            {"key": "base", "description": "Base fee", "price": {"model": "flat", "amount": fixed}}
        )
    all_charges.extend(charges or [])
    return PlanVersion.model_validate(
        {
            "code": code,
            "name": code.title(),
            "currency": currency,
            "interval": interval,
            "charges": all_charges,
            "version": version,
            "created_at": T0,
        }
    )


def customer(
    external_id: str = "acme",
    *,
    currency: str = "USD",
    timezone: str = "UTC",
    taxes: dict[str, str] | None = None,
    anchor: datetime | None = None,
) -> Customer:
    return Customer(
        external_id=external_id,
        name="Acme",
        currency=currency,
        timezone=timezone,
        billing_anchor=anchor,
        tax_rates={k: Decimal(v) for k, v in (taxes or {}).items()},
        created_at=T0,
        updated_at=T0,
    )


def subscribe(
    p: PlanVersion,
    start: str,
    *,
    trial_end: str | None = None,
    alignment: str = "calendar",
    cust: Customer | None = None,
    now: str | None = None,
) -> Subscription:
    req = SubscriptionIn.model_validate(
        {
            "customer_id": (cust or customer()).external_id,
            "plan_code": p.code,
            "plan_version": p.version,
            "start_at": start,
            "trial_end": trial_end,
            "alignment": alignment,
        }
    )
    return new_subscription("sub_1", req, cust or customer(), p, at(now or start))


def error_field(exc: Any) -> str:
    return ",".join(x["field"] for x in exc.details)
