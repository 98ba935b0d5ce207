"""Catalog schemas: plan versions, customers, subscriptions, upcoming invoices (JSON-able).

Plans are ``schemas.pricing.PlanSpec`` plus a version number: a published version is immutable.
A subscription pins ``(plan_code, plan_version)``; its ``history`` is the append-only list of
transitions (status and plan changes) that billing reads to split a period. The state machine
lives in ``rating.subscriptions``, the invoice assembly in ``rating.invoice``; see docs/catalog.md.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from schemas.jsonschema import (
    STORE_MAX,
    STORE_MIN,
    TIME_IN,
    TIME_IN_STORE,
    JsonInt,
    component,
    decimal_schema,
    integral,
)
from schemas.pricing import (
    KEY_PATTERN,
    Alignment,
    Currency,
    Interval,
    LineItem,
    PlanCharge,
    PlanSpec,
)
from schemas.timeutil import parse_time

_STRICT = ConfigDict(extra="forbid", frozen=True)

EXTERNAL_ID_MAX = 256  # the ingest ``customer`` field's limit (schemas.events.ID_MAX)
TAX_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$"
MAX_TAX_RATES = 8
MAX_METADATA = 50


def _time(value: object) -> datetime:
    """RFC 3339 with an offset, or epoch ms -> aware UTC (ms precision)."""
    return parse_time(value)


Time = Annotated[datetime, BeforeValidator(_time), WithJsonSchema(TIME_IN, mode="validation")]


def _store_time(value: object) -> datetime:
    """A time that ends up in stored rows: in the store's range, years 1900..2299."""
    dt = parse_time(value)
    if not STORE_MIN <= dt <= STORE_MAX:
        raise ValueError("must be in the years 1900..2299")
    return dt


StoreTime = Annotated[
    datetime, BeforeValidator(_store_time), WithJsonSchema(TIME_IN_STORE, mode="validation")
]


def _tz(value: object) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if not isinstance(value, str) or not value.strip():
        raise ValueError("timezone must be an IANA time zone name such as 'Europe/Paris'")
    name = value.strip()
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA time zone {value!r}") from None
    return name


def _zones() -> list[str]:
    from zoneinfo import available_timezones

    return sorted(available_timezones())


TIMEZONE_SCHEMA = {"type": "string", "description": "an IANA time zone name", "enum": _zones()}
TimeZone = Annotated[
    str, BeforeValidator(_tz), WithJsonSchema(component("TimeZone"), mode="validation")
]


def _tax_rate(value: object) -> object:
    value = integral(value)  # JSON 20.0 is the integer 20
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError('a tax rate is a percentage as a string or integer (e.g. "20")')
    return value


PERCENT = r"^(100(\.0{1,9})?|[0-9]{1,2}(\.[0-9]{1,9})?)$"
TaxRate = Annotated[
    Decimal,
    BeforeValidator(_tax_rate),
    Field(ge=0, le=100, allow_inf_nan=False),
    WithJsonSchema(
        {
            "description": 'a percentage 0..100 as a string or integer (e.g. "20")',
            "anyOf": [
                {"type": "string", "pattern": PERCENT},
                {"type": "integer", "minimum": 0, "maximum": 100},
            ],
        },
        mode="validation",
    ),
]


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------


class PlanDraft(BaseModel):
    """The body of ``POST /v1/plans/{code}/versions``: a full new version (the code is the
    path's). Omitted fields are copied from the latest version."""

    model_config = _STRICT

    name: str | None = Field(default=None, min_length=1, max_length=256)
    currency: Currency | None = None
    interval: Interval | None = None
    charges: list[PlanCharge] | None = None


class PlanVersion(PlanSpec):
    """One immutable, published version of a plan."""

    version: int = Field(ge=1)
    created_at: datetime

    def spec(self) -> PlanSpec:
        return PlanSpec(
            code=self.code,
            name=self.name,
            currency=self.currency,
            interval=self.interval,
            charges=list(self.charges),
        )

    @property
    def fixed_charges(self) -> list[PlanCharge]:
        return [c for c in self.charges if c.meter_slug is None]

    @property
    def usage_charges(self) -> list[PlanCharge]:
        return [c for c in self.charges if c.meter_slug is not None]


# ---------------------------------------------------------------------------------------------
# Customers
# ---------------------------------------------------------------------------------------------


# What the validators below check, for the JSON schemas (api.openapi).
NO_EDGE_BLANKS = r"^\S([\s\S]*\S)?$"
# What ``\s`` of that pattern matches (JSON Schema patterns are ECMA-262 regular expressions):
# the validator checks the same characters, not Python's ``str.strip()`` set, which also holds
# U+001C..U+001F and U+0085 and lacks U+FEFF.
ECMA_BLANKS = frozenset(
    "\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)
TAX_RATES_EXTRA: dict[str, Any] = {
    "maxProperties": MAX_TAX_RATES,
    "propertyNames": {"pattern": TAX_NAME_PATTERN},
}
METADATA_EXTRA: dict[str, Any] = {
    "maxProperties": MAX_METADATA,
    "propertyNames": {"minLength": 1, "maxLength": 64},
    "additionalProperties": {"type": "string", "maxLength": 1024},
}


def _check_tax_rates(v: dict[str, Decimal]) -> dict[str, Decimal]:
    import re

    if len(v) > MAX_TAX_RATES:
        raise ValueError(f"at most {MAX_TAX_RATES} tax rates")
    for name in v:
        if not re.match(TAX_NAME_PATTERN, name):
            raise ValueError(f"tax rate name {name!r} must be 1..64 letters, digits, ' _.-'")
    return v


def _check_metadata(v: dict[str, str]) -> dict[str, str]:
    if len(v) > MAX_METADATA:
        raise ValueError(f"at most {MAX_METADATA} metadata entries")
    for k, val in v.items():
        if not k or len(k) > 64:
            raise ValueError(f"metadata key {k!r} must be 1..64 characters")
        if len(val) > 1024:
            raise ValueError(f"metadata[{k}] must be at most 1024 characters")
    return v


class CustomerIn(BaseModel):
    """``POST /v1/customers``. ``external_id`` is what ingest events carry as ``customer``."""

    model_config = _STRICT

    external_id: str = Field(
        min_length=1,
        max_length=EXTERNAL_ID_MAX,
        json_schema_extra={"pattern": NO_EDGE_BLANKS},
    )
    name: str = Field(min_length=1, max_length=256)
    currency: Currency
    timezone: TimeZone = "UTC"
    billing_anchor: StoreTime | None = None
    tax_rates: dict[str, TaxRate] = Field(default_factory=dict, json_schema_extra=TAX_RATES_EXTRA)
    tax_inclusive: bool = Field(default=False, strict=True)
    metadata: dict[str, str] = Field(default_factory=dict, json_schema_extra=METADATA_EXTRA)

    @field_validator("external_id")
    @classmethod
    def _ext(cls, v: str) -> str:
        if v and (v[0] in ECMA_BLANKS or v[-1] in ECMA_BLANKS):
            raise ValueError("must not start or end with whitespace")
        return v

    @field_validator("tax_rates")
    @classmethod
    def _taxes(cls, v: dict[str, Decimal]) -> dict[str, Decimal]:
        return _check_tax_rates(v)

    @field_validator("metadata")
    @classmethod
    def _meta(cls, v: dict[str, str]) -> dict[str, str]:
        return _check_metadata(v)


class CustomerPatch(BaseModel):
    """``PATCH /v1/customers/{external_id}``: only the given fields change.
    ``billing_anchor: null`` clears the anchor."""

    model_config = _STRICT

    name: str | None = Field(default=None, min_length=1, max_length=256)
    currency: Currency | None = None
    timezone: TimeZone | None = None
    billing_anchor: StoreTime | None = None
    tax_rates: dict[str, TaxRate] | None = Field(default=None, json_schema_extra=TAX_RATES_EXTRA)
    tax_inclusive: bool | None = Field(default=None, strict=True)
    metadata: dict[str, str] | None = Field(default=None, json_schema_extra=METADATA_EXTRA)

    @field_validator("tax_rates")
    @classmethod
    def _taxes(cls, v: dict[str, Decimal] | None) -> dict[str, Decimal] | None:
        return None if v is None else _check_tax_rates(v)

    @field_validator("metadata")
    @classmethod
    def _meta(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return None if v is None else _check_metadata(v)


class Customer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    external_id: str
    name: str
    currency: str
    timezone: str = "UTC"
    billing_anchor: datetime | None = None
    tax_rates: dict[str, Decimal] = Field(default_factory=dict)
    tax_inclusive: bool = False  # prices include the taxes (they are extracted, not added)
    metadata: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime
    revision: int = 1


# ---------------------------------------------------------------------------------------------
# Subscriptions
# ---------------------------------------------------------------------------------------------


class SubscriptionStatus(StrEnum):
    TRIALING = "trialing"
    ACTIVE = "active"
    PAUSED = "paused"
    CANCELED = "canceled"


class Action(StrEnum):
    ACTIVATE = "activate"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"


class ActionTiming(StrEnum):
    NOW = "now"
    PERIOD_END = "period_end"


class ChangeTiming(StrEnum):
    IMMEDIATE = "immediate"
    PERIOD_END = "period_end"


class TransitionKind(StrEnum):
    """What a history entry records."""

    CREATE = "create"
    ACTIVATE = "activate"
    TRIAL_END = "trial_end"  # automatic trialing -> active at trial_end
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    CHANGE_PLAN = "change_plan"


class Transition(BaseModel):
    """One entry of a subscription's history: the state right after ``at``."""

    model_config = _STRICT

    at: datetime
    kind: TransitionKind
    status: SubscriptionStatus
    plan_code: str
    plan_version: int


class PendingChange(BaseModel):
    """A plan change scheduled for ``effective_at`` (a period end)."""

    model_config = _STRICT

    plan_code: str
    plan_version: int
    effective_at: datetime


class Subscription(BaseModel):
    """A customer's subscription to a pinned plan version.

    ``currency``, ``interval`` and ``timezone`` are pinned at creation (the customer's time zone
    then), so the billing periods never move. ``status``/``plan_*`` are the current state; ``history`` (ordered by ``at``) is every state
    the subscription went through, starting with ``create``. ``cancel_at`` and ``pending_change``
    are scheduled transitions, applied by ``rating.subscriptions.advance`` once due.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    customer_id: str
    status: SubscriptionStatus
    plan_code: str
    plan_version: int
    currency: str
    interval: Interval
    timezone: str
    alignment: Alignment
    anchor: datetime
    start_at: datetime
    trial_end: datetime | None = None
    cancel_at: datetime | None = None
    canceled_at: datetime | None = None
    pending_change: PendingChange | None = None
    history: list[Transition]
    created_at: datetime
    updated_at: datetime
    revision: int = 1


class SubscriptionIn(BaseModel):
    """``POST /v1/subscriptions``.

    ``plan_version`` defaults to the latest. ``start_at`` defaults to now. With ``trial_end``
    (after ``start_at``) the subscription starts ``trialing``, else ``active``. ``alignment``:
    ``calendar`` periods start on the 1st (of the month/quarter/year) at local midnight in the
    customer's time zone; ``anniversary`` periods start on the customer's ``billing_anchor``,
    or the subscription start when the customer has none.
    """

    model_config = _STRICT

    customer_id: str = Field(min_length=1, max_length=EXTERNAL_ID_MAX)
    plan_code: str = Field(pattern=KEY_PATTERN)
    plan_version: Annotated[JsonInt, Field(ge=1)] | None = None
    start_at: StoreTime | None = None
    trial_end: StoreTime | None = None
    alignment: Alignment = Alignment.CALENDAR

    @model_validator(mode="after")
    def _trial(self) -> Any:
        if (
            self.trial_end is not None
            and self.start_at is not None
            and self.trial_end <= self.start_at
        ):
            raise ValueError("trial_end must be after start_at")
        return self


class ActionIn(BaseModel):
    """``POST /v1/subscriptions/{id}/actions``; ``at: period_end`` is for ``cancel`` only."""

    model_config = _STRICT

    action: Action
    at: ActionTiming = ActionTiming.NOW

    @model_validator(mode="after")
    def _at(self) -> Any:
        if self.at is ActionTiming.PERIOD_END and self.action is not Action.CANCEL:
            raise ValueError("at: 'period_end' is only allowed with action 'cancel'")
        return self


class ChangePlanIn(BaseModel):
    """``POST /v1/subscriptions/{id}/change-plan``. Without ``timing``, an upgrade (new fixed
    fees per period >= old ones) is immediate and a downgrade waits for the period end."""

    model_config = _STRICT

    plan_code: str = Field(pattern=KEY_PATTERN)
    version: Annotated[JsonInt, Field(ge=1)] | None = None
    timing: ChangeTiming | None = None


# ---------------------------------------------------------------------------------------------
# Invoices and preview
# ---------------------------------------------------------------------------------------------


class TaxAmount(BaseModel):
    model_config = _STRICT

    name: str
    rate: Decimal
    amount: Decimal


class UpcomingInvoice(BaseModel):
    """The current period's invoice so far: usage from live pre-aggregates, fixed fees billed
    in advance and proration lines. ``subtotal`` = sum of the rounded lines, ``tax`` = sum of
    the per-line rounded taxes, ``total = subtotal + tax``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    customer_id: str
    subscription_id: str
    plan_code: str
    plan_version: int
    status: SubscriptionStatus
    currency: str
    period_start: datetime
    period_end: datetime
    as_of: datetime
    lines: list[LineItem]
    subtotal: Decimal
    taxes: list[TaxAmount]
    tax: Decimal
    total: Decimal


def _quantity(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("a quantity is a decimal number (string or integer), not a boolean")
    value = integral(value)  # JSON 3.0 is the integer 3
    if isinstance(value, float):
        raise ValueError(
            "a quantity is a decimal number as a string or integer (at most 2**53), not a float"
        )
    return value


Quantity = Annotated[
    Decimal,
    BeforeValidator(_quantity),
    Field(ge=0, allow_inf_nan=False),
    WithJsonSchema(decimal_schema("nonneg"), mode="validation"),
]


class PreviewIn(BaseModel):
    """``POST /v1/rating/preview``: rate a price or a plan against given quantities.

    Exactly one of ``price`` (with ``quantity``, or ``usage`` holding one entry), ``plan`` (an
    inline plan spec) or ``plan_code`` (a stored plan, latest or ``plan_version``). ``usage``
    maps a meter slug to a quantity, or, for a charge priced per group, to ``{group value:
    quantity}``. Nothing is stored.
    """

    model_config = _STRICT

    price: dict[str, Any] | None = None
    quantity: Quantity | None = None
    currency: Currency | None = None
    plan: PlanSpec | None = None
    plan_code: str | None = Field(default=None, pattern=KEY_PATTERN)
    plan_version: Annotated[JsonInt, Field(ge=1)] | None = None
    usage: dict[str, Quantity | dict[str, Quantity]] = Field(default_factory=dict)
    tax_rates: dict[str, TaxRate] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one(self) -> Any:
        given = [n for n in ("price", "plan", "plan_code") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of price, plan or plan_code")
        if self.price is None and self.quantity is not None:
            raise ValueError("quantity is only used with price; use usage for a plan")
        if self.plan_code is None and self.plan_version is not None:
            raise ValueError("plan_version needs plan_code")
        return self


class PreviewOut(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str
    lines: list[LineItem]
    subtotal: Decimal
    taxes: list[TaxAmount]
    tax: Decimal
    total: Decimal
