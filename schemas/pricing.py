"""Price, plan and line-item schemas (JSON-able; Decimals serialize as strings).

A price is a discriminated union on ``model``. ``rating/`` rates a price against a quantity.
Validation errors (pydantic) name the offending field. See docs/pricing.md.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from schemas.jsonschema import component, decimal_schema, integral

# ---------------------------------------------------------------------------------------------
# ISO 4217: active currency codes and their exponents (number of minor-unit digits).
# Source: the ISO 4217 list (List One, published 2026-01-01). Codes whose minor unit is "N.A."
# (precious metals XAU/XAG/XPT/XPD, bond-market units XBA..XBD, XDR, XSU, XUA, XTS, XXX) are
# deliberately absent: they cannot be used to price anything.
# ---------------------------------------------------------------------------------------------

_EXPONENT_0 = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
_EXPONENT_2 = (
    "AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BMD BND BOB BOV BRL BSD BTN BWP BYN BZD "
    "CAD CDF CHE CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP "
    "GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK "
    "LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO "
    "NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS "
    "SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST "
    "XAD XCD XCG YER ZAR ZMW ZWG"
)
_EXPONENT_3 = "BHD IQD JOD KWD LYD OMR TND"
_EXPONENT_4 = "CLF UYW"

CURRENCY_EXPONENTS: dict[str, int] = {
    code: exp
    for exp, codes in ((0, _EXPONENT_0), (2, _EXPONENT_2), (3, _EXPONENT_3), (4, _EXPONENT_4))
    for code in codes.split()
}


def currency_exponent(code: str) -> int:
    """Minor-unit digits of an ISO 4217 code (``KeyError`` if unknown; see validate_currency)."""
    return CURRENCY_EXPONENTS[code]


def validate_currency(value: object) -> str:
    """Normalize (upper-case) and check an ISO 4217 code; ``ValueError`` if unknown."""
    if not isinstance(value, str):
        raise ValueError("currency must be a 3-letter ISO 4217 code")
    code = value.strip().upper()
    if code not in CURRENCY_EXPONENTS:
        raise ValueError(f"unknown currency {value!r} (not an active ISO 4217 code)")
    return code


# ---------------------------------------------------------------------------------------------
# Exact numbers. Floats are refused (money is never float); strings and ints are accepted.
# ---------------------------------------------------------------------------------------------


def _no_float(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("expected a decimal number (string or integer), got a boolean")
    value = integral(value)  # JSON 10.0 is the integer 10
    if isinstance(value, float):
        raise ValueError(
            "expected a decimal number as a string or integer (at most 2**53), not a float"
        )
    return value


_IN = "validation"  # the JSON schemas below describe inputs; answers keep pydantic's own
Num = Annotated[
    Decimal,
    BeforeValidator(_no_float),
    Field(allow_inf_nan=False),
    WithJsonSchema(decimal_schema("any"), mode=_IN),
]
NonNeg = Annotated[
    Decimal,
    BeforeValidator(_no_float),
    Field(ge=0, allow_inf_nan=False),
    WithJsonSchema(decimal_schema("nonneg"), mode=_IN),
]
Positive = Annotated[
    Decimal,
    BeforeValidator(_no_float),
    Field(gt=0, allow_inf_nan=False),
    WithJsonSchema(decimal_schema("positive"), mode=_IN),
]
CURRENCY_SCHEMA = {
    "type": "string",
    "description": "an active ISO 4217 code (case-insensitive)",
    "enum": sorted(CURRENCY_EXPONENTS) + sorted(c.lower() for c in CURRENCY_EXPONENTS),
}
Currency = Annotated[
    str, BeforeValidator(validate_currency), WithJsonSchema(component("Currency"), mode=_IN)
]


class RoundMode(StrEnum):
    UP = "up"
    DOWN = "down"


_STRICT = ConfigDict(extra="forbid", frozen=True)


class _PriceBase(BaseModel):
    """Fields every price carries: optional currency and the wrappers.

    - ``free_units``: subtracted from the quantity before pricing (floored at 0).
    - ``minimum`` / ``maximum``: per-period commitment floor / cap on the amount.
    """

    model_config = _STRICT

    currency: Currency | None = None
    free_units: NonNeg = Decimal(0)
    minimum: NonNeg | None = None
    maximum: NonNeg | None = None

    @model_validator(mode="after")
    def _min_max(self) -> Any:
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError("minimum must not exceed maximum")
        return self


class FlatPrice(_PriceBase):
    """A fixed fee per period; the quantity is ignored."""

    model: Literal["flat"] = "flat"
    amount: NonNeg


class PackageTransform(BaseModel):
    """Quantity divided by ``divide_by`` and rounded to an integer before the unit price."""

    model_config = _STRICT

    divide_by: Positive
    round: RoundMode = RoundMode.UP


class PerUnitPrice(_PriceBase):
    model: Literal["per_unit"] = "per_unit"
    unit_amount: NonNeg
    package: PackageTransform | None = None


class Tier(BaseModel):
    """``up_to`` is inclusive; the last tier has ``up_to: null``."""

    model_config = _STRICT

    up_to: Positive | None
    unit_amount: NonNeg = Decimal(0)
    flat_amount: NonNeg = Decimal(0)


def _check_bands(bands: list[Any], field: str) -> None:
    """Bands must be non-empty, strictly increasing, and end with one open band (null)."""
    if not bands:
        raise ValueError(f"{field} must not be empty")
    previous: Decimal | None = None
    for i, band in enumerate(bands):
        last = i == len(bands) - 1
        if band.up_to is None:
            if not last:
                raise ValueError(f"{field}[{i}].up_to: only the last entry may be open (null)")
            continue
        if last:
            raise ValueError(f"{field}[{i}].up_to: the last entry must be open (up_to: null)")
        if previous is not None and band.up_to <= previous:
            raise ValueError(
                f"{field}[{i}].up_to: must be greater than the previous up_to ({previous}); "
                "entries overlap or are out of order"
            )
        previous = band.up_to


class _TieredPrice(_PriceBase):
    tiers: list[Tier]

    @field_validator("tiers")
    @classmethod
    def _tiers(cls, v: list[Tier]) -> list[Tier]:
        _check_bands(v, "tiers")
        return v


class GraduatedPrice(_TieredPrice):
    """Each tier's slice at that tier's rate, plus the flat fee of every tier reached."""

    model: Literal["graduated"] = "graduated"


class VolumePrice(_TieredPrice):
    """Every unit at the rate of the tier the total falls in, plus that tier's flat fee."""

    model: Literal["volume"] = "volume"


class PackagePrice(_PriceBase):
    """``amount`` per started (round up) or completed (round down) package of units."""

    model: Literal["package"] = "package"
    package_size: Positive
    amount: NonNeg
    round: RoundMode = RoundMode.UP


class Step(BaseModel):
    model_config = _STRICT

    up_to: Positive | None
    amount: NonNeg


class StaircasePrice(_PriceBase):
    """One fixed amount for the band the quantity falls in."""

    model: Literal["staircase"] = "staircase"
    steps: list[Step]

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[Step]) -> list[Step]:
        _check_bands(v, "steps")
        return v


class PercentagePrice(_PriceBase):
    """A percentage of a transaction-amount meter.

    ``rate`` is a percentage ("2.9" means 2.9 %). ``fixed_amount`` is charged per event.
    ``min_per_event`` / ``max_per_event`` clamp each event's fee (rate part + fixed fee).
    ``free_units`` is a free transaction amount, consumed by the earliest events first.
    """

    model: Literal["percentage"] = "percentage"
    rate: NonNeg
    fixed_amount: NonNeg = Decimal(0)
    min_per_event: NonNeg | None = None
    max_per_event: NonNeg | None = None

    @model_validator(mode="after")
    def _per_event(self) -> Any:
        lo, hi = self.min_per_event, self.max_per_event
        if lo is not None and hi is not None and lo > hi:
            raise ValueError("min_per_event must not exceed max_per_event")
        return self


PriceSpec = Annotated[
    FlatPrice
    | PerUnitPrice
    | GraduatedPrice
    | VolumePrice
    | PackagePrice
    | StaircasePrice
    | PercentagePrice,
    Field(discriminator="model"),
]

PRICE_ADAPTER: TypeAdapter[PriceSpec] = TypeAdapter(PriceSpec)


def parse_price(data: Any) -> PriceSpec:
    """Validate a JSON-like dict into a price spec (pydantic ValidationError names the field)."""
    return PRICE_ADAPTER.validate_python(data)


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------

KEY_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class Interval(StrEnum):
    MONTH = "month"
    QUARTER = "quarter"
    YEAR = "year"


class Alignment(StrEnum):
    """How billing periods are aligned: to the calendar (1st of the month/quarter/year) or to
    the anniversary of an anchor date (e.g. the subscription start)."""

    CALENDAR = "calendar"
    ANNIVERSARY = "anniversary"


class PlanCharge(BaseModel):
    """One charge of a plan. ``meter_slug`` None means a fixed fee (billed per period)."""

    model_config = _STRICT

    key: str = Field(pattern=KEY_PATTERN)
    meter_slug: str | None = Field(default=None, pattern=KEY_PATTERN)
    price: PriceSpec
    group_by: str | None = Field(default=None, min_length=1)
    description: str = ""

    @model_validator(mode="after")
    def _fixed(self) -> Any:
        if self.meter_slug is None and self.group_by is not None:
            raise ValueError("group_by needs a meter_slug (a fixed fee has no dimensions)")
        if self.meter_slug is None and isinstance(self.price, PercentagePrice):
            raise ValueError("price: a percentage price needs a meter_slug")
        return self


class PlanSpec(BaseModel):
    model_config = _STRICT

    code: str = Field(pattern=KEY_PATTERN)
    name: str = Field(min_length=1)
    currency: Currency
    interval: Interval = Interval.MONTH
    charges: list[PlanCharge] = Field(default_factory=list)

    @model_validator(mode="after")
    def _charges(self) -> Any:
        seen: set[str] = set()
        for i, charge in enumerate(self.charges):
            if charge.key in seen:
                raise ValueError(f"charges[{i}].key: duplicate key {charge.key!r}")
            seen.add(charge.key)
            cur = charge.price.currency
            if cur is not None and cur != self.currency:
                raise ValueError(
                    f"charges[{i}].price.currency: {cur} does not match the plan currency "
                    f"{self.currency}"
                )
        return self


# ---------------------------------------------------------------------------------------------
# Rated output
# ---------------------------------------------------------------------------------------------


class LineKind(StrEnum):
    USAGE = "usage"
    FIXED = "fixed"
    PRORATION = "proration"
    MINIMUM_ADJUSTMENT = "minimum_adjustment"
    DISCOUNT = "discount"  # a discount (negative), per charge or per invoice
    ADJUSTMENT = "adjustment"  # late usage of an earlier, finalized period
    CREDIT = "credit"  # a credit note line


class BreakdownPart(BaseModel):
    """One exact (unrounded) component of a rated amount."""

    model_config = _STRICT

    label: str
    quantity: Decimal | None = None
    unit_amount: Decimal | None = None
    amount: Decimal


class LineItem(BaseModel):
    """One invoice line. ``amount`` is rounded half-up, once, to the currency's exponent.

    ``exact_amount`` is the unrounded amount as a decimal string, or ``"p/q"`` when it is not a
    finite decimal (prorations).
    """

    model_config = _STRICT

    kind: LineKind
    description: str = ""
    charge_key: str | None = None
    meter_slug: str | None = None
    group: dict[str, str] | None = None
    quantity: Decimal
    price: PriceSpec | None = None
    currency: Currency
    amount: Decimal
    exact_amount: str
    breakdown: list[BreakdownPart] = Field(default_factory=list)
    period_start: datetime | None = None
    period_end: datetime | None = None
