"""Billing schemas: invoices, credit notes, discounts, corrections, webhooks, thresholds,
reconciliation and the audit trail (JSON-able; Decimals serialize as strings).

The invoice lifecycle and the use-cases live in ``billing/``; the money math in ``rating/``.
See docs/invoicing.md.
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

from schemas.catalog import StoreTime, TaxAmount
from schemas.jsonschema import JsonInt, component, decimal_schema, integral
from schemas.pricing import KEY_PATTERN, BreakdownPart

_STRICT = ConfigDict(extra="forbid", frozen=True)
_DOC = ConfigDict(extra="ignore", frozen=True)


def _no_float(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("expected a decimal number (string or integer), got a boolean")
    value = integral(value)  # JSON 10.0 is the integer 10
    if isinstance(value, float):
        raise ValueError(
            "expected a decimal number as a string or integer (at most 2**53), not a float"
        )
    return value


_IN = "validation"
Amount = Annotated[
    Decimal,
    BeforeValidator(_no_float),
    Field(allow_inf_nan=False),
    WithJsonSchema(decimal_schema("any"), mode=_IN),
]
PositiveAmount = Annotated[
    Decimal,
    BeforeValidator(_no_float),
    Field(gt=0, allow_inf_nan=False),
    WithJsonSchema(decimal_schema("positive"), mode=_IN),
]
PERCENTAGE = r"^(100(\.0{1,9})?|[1-9][0-9]?(\.[0-9]{1,9})?|0?\.[0-9]{0,8}[1-9][0-9]{0,8})$"
Percentage = Annotated[
    Decimal,
    BeforeValidator(_no_float),
    Field(gt=0, le=100),
    WithJsonSchema(
        {
            "description": "a percentage in (0, 100] as a string or integer",
            "anyOf": [
                {"type": "string", "pattern": PERCENTAGE},
                {"type": "integer", "minimum": 1, "maximum": 100},
            ],
        },
        mode=_IN,
    ),
]
NonNegAmount = Annotated[
    Decimal,
    BeforeValidator(_no_float),
    Field(ge=0),
    WithJsonSchema(decimal_schema("nonneg"), mode=_IN),
]


# ---------------------------------------------------------------------------------------------
# Invoices
# ---------------------------------------------------------------------------------------------


class InvoiceStatus(StrEnum):
    DRAFT = "draft"
    FINALIZED = "finalized"
    VOID = "void"


class InvoiceLine(BaseModel):
    """One line of an invoice or credit note. ``amount`` is rounded once (half-up, currency
    exponent); ``exact_amount`` keeps the unrounded value. ``key`` identifies the charge line
    across re-ratings (charge, kind, group, segment) so late usage can be diffed per line;
    ``adjusts`` names the invoice an adjustment line corrects."""

    model_config = _DOC

    kind: str
    description: str
    quantity: Decimal
    unit_amount: Decimal | None = None
    amount: Decimal
    exact_amount: str | None = None
    currency: str
    period_start: datetime | None = None
    period_end: datetime | None = None
    charge_key: str | None = None
    meter_slug: str | None = None
    group: dict[str, str] | None = None
    breakdown: list[BreakdownPart] = Field(default_factory=list)
    tax: Decimal = Decimal(0)
    key: str | None = None
    adjusts: str | None = None


class UsageSnapshot(BaseModel):
    """The exact quantities an invoice was rated on: one entry per usage key."""

    model_config = _DOC

    meter_slug: str
    group_by: str | None = None
    start: datetime
    end: datetime
    amounts: list[dict[str, Any]] = Field(default_factory=list)  # {quantity, group?, events?}


class Contract(BaseModel):
    """What an invoice was priced with, frozen at creation: later edits never change it."""

    model_config = _DOC

    tenant_name: str = ""
    customer_name: str
    tax_rates: dict[str, Decimal] = Field(default_factory=dict)
    tax_inclusive: bool = False
    plans: list[str] = Field(default_factory=list)  # "code vN"
    discounts: list[dict[str, Any]] = Field(default_factory=list)  # the discounts in force


class Invoice(BaseModel):
    """An invoice of one subscription period. ``id`` is deterministic per (tenant,
    subscription, period, revision); ``number`` is given on finalization (gapless per tenant).
    ``subtotal`` = sum of the rounded lines (net of tax when ``tax_inclusive``), ``tax`` = sum
    of the per-line rounded taxes, ``total`` = what the customer pays."""

    model_config = _DOC

    id: str
    number: str | None = None
    customer_id: str
    subscription_id: str
    period_start: datetime
    period_end: datetime
    status: InvoiceStatus
    currency: str
    lines: list[InvoiceLine]
    subtotal: Decimal
    taxes: list[TaxAmount] = Field(default_factory=list)
    tax: Decimal
    total: Decimal
    tax_inclusive: bool = False
    revision: int = 0
    replaces: str | None = None
    replaced_by: str | None = None
    void_reason: str | None = None
    contract: Contract
    usage: list[UsageSnapshot] = Field(default_factory=list)
    usage_as_of: datetime
    created_at: datetime
    updated_at: datetime
    finalized_at: datetime | None = None
    voided_at: datetime | None = None
    credited: Decimal = Decimal(0)  # sum of the totals of its credit notes (filled on read)
    run_id: str | None = None  # the invoice run that created it


class CreditNote(BaseModel):
    model_config = _DOC

    id: str
    number: str
    invoice_id: str
    invoice_number: str | None = None
    customer_id: str
    currency: str
    reason: str
    automatic: bool = False  # issued by Tally for late usage that lowered an amount
    lines: list[InvoiceLine]
    subtotal: Decimal
    taxes: list[TaxAmount] = Field(default_factory=list)
    tax: Decimal
    total: Decimal
    tax_inclusive: bool = False
    contract: Contract
    created_at: datetime


class RunIn(BaseModel):
    """``POST /v1/invoices/run``: close every period that ended (plus grace) before ``as_of``."""

    model_config = _STRICT

    as_of: StoreTime | None = None


class RunOut(BaseModel):
    model_config = _STRICT

    created: list[str]
    existing: int
    finalized: list[str] = Field(default_factory=list)
    credit_notes: list[str] = Field(default_factory=list)


class VoidIn(BaseModel):
    model_config = _STRICT

    reason: str = Field(min_length=1, max_length=1000)
    replace: bool = Field(
        default=False, strict=True
    )  # issue a replacement draft for the same period


class CreditLineIn(BaseModel):
    model_config = _STRICT

    line: JsonInt = Field(ge=0)  # index into the invoice's lines
    amount: PositiveAmount | None = None  # default: the whole (remaining) line


class CreditNoteIn(BaseModel):
    """``POST /v1/invoices/{id}/credit-notes``: ``lines`` (per line), ``amount`` (a lump sum,
    before tax) or neither (the whole invoice)."""

    model_config = _STRICT

    reason: str = Field(min_length=1, max_length=1000)
    lines: list[CreditLineIn] | None = None
    amount: PositiveAmount | None = None

    @model_validator(mode="after")
    def _one(self) -> Any:
        if self.lines is not None and self.amount is not None:
            raise ValueError("give lines or amount, not both")
        if self.lines is not None and not self.lines:
            raise ValueError("lines must not be empty (omit it to credit the whole invoice)")
        return self


# ---------------------------------------------------------------------------------------------
# Discounts
# ---------------------------------------------------------------------------------------------


class DiscountIn(BaseModel):
    """A customer discount: ``percentage`` (of the charge or of the invoice) or ``amount``
    (fixed, in the invoice currency), on one charge (``charge_key``) or the whole invoice;
    it applies to periods that start before ``expires_at`` (and end after ``starts_at``)."""

    model_config = _STRICT

    percentage: Percentage | None = None
    amount: PositiveAmount | None = None
    charge_key: str | None = Field(default=None, pattern=KEY_PATTERN)
    starts_at: StoreTime | None = None
    expires_at: StoreTime | None = None
    description: str = Field(default="", max_length=256)

    @model_validator(mode="after")
    def _one(self) -> Any:
        if (self.percentage is None) == (self.amount is None):
            raise ValueError("give exactly one of percentage or amount")
        if self.starts_at and self.expires_at and self.expires_at <= self.starts_at:
            raise ValueError("expires_at must be after starts_at")
        return self


class Discount(DiscountIn):
    model_config = _DOC

    id: str
    customer_id: str
    created_at: datetime
    deleted: bool = False


# ---------------------------------------------------------------------------------------------
# Event corrections
# ---------------------------------------------------------------------------------------------


class CorrectionAction(StrEnum):
    VOID = "void"
    AMEND = "amend"


class CorrectionIn(BaseModel):
    """``POST /v1/events/{id}/corrections``: ``void`` removes the event's contribution,
    ``amend`` replaces its properties (time, customer and type stay)."""

    model_config = _STRICT

    action: CorrectionAction
    properties: dict[str, Any] | None = Field(
        default=None, json_schema_extra={"additionalProperties": component("JsonValue")}
    )
    reason: str = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _props(self) -> Any:
        if self.action is CorrectionAction.AMEND and self.properties is None:
            raise ValueError("amend needs properties (the event's new properties)")
        if self.action is CorrectionAction.VOID and self.properties is not None:
            raise ValueError("void takes no properties")
        return self


class Correction(BaseModel):
    model_config = _DOC

    id: str
    event_id: str
    action: CorrectionAction
    reason: str
    actor: str
    created_at: datetime
    customer: str
    event_time: datetime
    properties_before: dict[str, Any]
    properties_after: dict[str, Any] | None = None
    applied_meters: list[str] = Field(default_factory=list)
    # Always empty since every aggregation is corrected exactly (kept for the issue-10 shape).
    unapplied_meters: list[dict[str, str]] = Field(default_factory=list)
    # The position of the correction in the tenant's correction log (1, 2, ...; 0 = recorded
    # before the log existed).
    seq: int = 0
    # Per meter the event feeds: what counts it, "stream" or "backfill" (a backfill run; a void of
    # an event no complete run counted takes nothing away).
    targets: list[dict[str, str]] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Webhooks and thresholds
# ---------------------------------------------------------------------------------------------

EVENT_TYPES = (
    "invoice.created",
    "invoice.finalized",
    "invoice.voided",
    "credit_note.created",
    "usage.threshold_crossed",
)


class WebhookEndpointIn(BaseModel):
    model_config = _STRICT

    url: str = Field(
        min_length=8,
        max_length=2048,
        json_schema_extra={
            "pattern": r"^https?://[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?(/[!-~]*)?$"
        },
    )
    events: list[str] = Field(
        default_factory=lambda: list(EVENT_TYPES),
        json_schema_extra={"minItems": 1, "items": {"type": "string", "enum": list(EVENT_TYPES)}},
    )
    description: str = Field(default="", max_length=256)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an absolute http(s) URL")
        return v

    @field_validator("events")
    @classmethod
    def _events(cls, v: list[str]) -> list[str]:
        for e in v:
            if e not in EVENT_TYPES:
                raise ValueError(f"unknown event type {e!r} (known: {', '.join(EVENT_TYPES)})")
        if not v:
            raise ValueError("events must not be empty")
        return sorted(set(v))


class WebhookEndpoint(BaseModel):
    model_config = _DOC

    id: str
    url: str
    events: list[str]
    description: str = ""
    created_at: datetime
    disabled: bool = False
    secret: str | None = None  # only in the answer that creates the endpoint


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # gave up after the last attempt


class DeliveryAttempt(BaseModel):
    model_config = _DOC

    attempt: int
    at: datetime
    status_code: int | None = None
    error: str = ""
    duration_ms: int = 0


class Delivery(BaseModel):
    model_config = _DOC

    id: str
    endpoint_id: str
    event_id: str
    event_type: str
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str = ""
    created_at: datetime
    updated_at: datetime
    payload: dict[str, Any] = Field(default_factory=dict)
    log: list[DeliveryAttempt] = Field(default_factory=list)


class ThresholdIn(BaseModel):
    """Notify (``usage.threshold_crossed``) when the customer's usage of ``meter_slug`` in the
    current billing period reaches ``value``."""

    model_config = _STRICT

    meter_slug: str = Field(pattern=KEY_PATTERN)
    value: PositiveAmount


class Threshold(ThresholdIn):
    model_config = _DOC

    id: str
    customer_id: str
    created_at: datetime
    deleted: bool = False


# ---------------------------------------------------------------------------------------------
# Audit trail and reconciliation
# ---------------------------------------------------------------------------------------------


class AuditRecord(BaseModel):
    model_config = _DOC

    object_type: str
    object_id: str
    action: str
    actor: str
    at: datetime
    data: dict[str, Any] = Field(default_factory=dict)


class ExternalLine(BaseModel):
    """One line of another system's invoice, for reconciliation."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    customer_id: str = Field(min_length=1)
    charge: str = Field(min_length=1)
    group: str = ""
    quantity: Amount | None = None
    amount: Amount


class ReconciliationIn(BaseModel):
    model_config = _STRICT

    period_start: StoreTime
    period_end: StoreTime
    lines: list[ExternalLine]
    amount_tolerance: NonNegAmount = Decimal(0)


class DiffStatus(StrEnum):
    MATCHED = "matched"
    MISSING = "missing"  # billed by Tally, absent from the other system
    EXTRA = "extra"  # in the other system, not billed by Tally
    QUANTITY_MISMATCH = "quantity_mismatch"
    AMOUNT_MISMATCH = "amount_mismatch"


class DiffLine(BaseModel):
    model_config = _STRICT

    customer_id: str
    charge: str
    group: str = ""
    status: DiffStatus
    tally_quantity: Decimal | None = None
    other_quantity: Decimal | None = None
    tally_amount: Decimal | None = None
    other_amount: Decimal | None = None
    amount_difference: Decimal


class ReconciliationReport(BaseModel):
    model_config = _STRICT

    period_start: datetime
    period_end: datetime
    lines: list[DiffLine]
    counts: dict[str, int]
    tally_total: Decimal
    other_total: Decimal
    difference: Decimal
    match_rate: Decimal  # percent of line keys that match, 2 decimals
