"""Usage queries: what to aggregate (``UsageQuery``) and what comes back (``UsageRow``).

``from_`` is inclusive, ``to`` exclusive; both are whole minutes (usage is stored per minute).
Windows are calendar buckets in the IANA time zone ``tz``: HOUR windows start whenever the local
clock shows HH:00 (so a DST change of 30 minutes gives one 90- or 30-minute window), DAY windows
at local midnight (23 or 25 hours around DST), MONTH windows on the 1st at local midnight.
Without a window there is one row per group covering ``[from_, to)``.

Grouping: ``group_by`` names dimensions of ``meter.group_by``; the name ``customer`` (or
``by_customer=True``) groups by customer. ``filters`` maps a dimension (or ``customer``) to the
allowed values. Invalid input raises ``tally.errors.ValidationError`` naming the field.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import NamedTuple
from zoneinfo import available_timezones

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.meters import Meter
from tally.errors import ValidationError

CUSTOMER = "customer"
MAX_FILTER_VALUES = 10_000


class UsageMeter(NamedTuple):
    """A meter as usage queries take it: its definition, and whether, when it was read, the
    stream's minute rows alone answered every query of it (``stream_only``: the meter had no
    complete backfill run and no event correction). A query that knows this from a recent read
    skips the statement asking it (``clickhouse.usage.usage_values``); the API caches it with
    the meter (``api.meterlookup``, bounds in docs/operations.md)."""

    meter: Meter
    stream_only: bool


class WindowSize(StrEnum):
    MINUTE = "MINUTE"
    HOUR = "HOUR"
    DAY = "DAY"
    MONTH = "MONTH"


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def _bad(field: str, message: str) -> ValidationError:
    return ValidationError(f"{field}: {message}", field=field)


def _instant(field: str, value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise _bad(field, "must be timezone-aware")
    value = value.astimezone(UTC)
    if value.second or value.microsecond:
        raise _bad(field, f"must be a whole minute, got {value.isoformat()}")
    return value


class UsageQuery(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    tenant_id: str = Field(min_length=1)
    meter: Meter
    from_: datetime = Field(
        validation_alias=AliasChoices("from_", "from"), serialization_alias="from"
    )
    to: datetime
    window: WindowSize | None = None
    tz: str = "UTC"
    customers: list[str] = Field(default_factory=list)
    group_by: list[str] = Field(default_factory=list)
    filters: dict[str, list[str]] = Field(default_factory=dict)
    by_customer: bool = False  # same as "customer" in group_by

    @field_validator("from_")
    @classmethod
    def _from(cls, v: datetime) -> datetime:
        return _instant("from", v)

    @field_validator("to")
    @classmethod
    def _to(cls, v: datetime) -> datetime:
        return _instant("to", v)

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str) -> str:
        if v not in _zones():
            raise _bad("tz", f"unknown IANA time zone {v!r}")
        return v

    @field_validator("customers")
    @classmethod
    def _customers(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_FILTER_VALUES:
            raise _bad("customers", f"at most {MAX_FILTER_VALUES} values")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _check(self) -> UsageQuery:
        if self.from_ >= self.to:
            raise _bad(
                "from", f"must be before to ({self.from_.isoformat()} >= {self.to.isoformat()})"
            )
        if self.tenant_id != self.meter.tenant_id:
            raise _bad("meter", "meter belongs to another tenant")
        known = set(self.meter.group_by)
        seen: list[str] = []
        for name in self.group_by:
            if name != CUSTOMER and name not in known:
                raise _bad(
                    "group_by",
                    f"{name!r} is not a group_by dimension of meter '{self.meter.slug}' "
                    f"(known: {', '.join(sorted(known | {CUSTOMER}))})",
                )
            if name not in seen:
                seen.append(name)
        if self.by_customer and CUSTOMER not in seen:
            seen.insert(0, CUSTOMER)
        object.__setattr__(self, "group_by", seen)
        for name, values in self.filters.items():
            if name != CUSTOMER and name not in known:
                raise _bad(
                    "filters", f"{name!r} is not a group_by dimension of meter '{self.meter.slug}'"
                )
            if not values or len(values) > MAX_FILTER_VALUES:
                raise _bad(f"filters.{name}", f"needs 1..{MAX_FILTER_VALUES} values")
        return self

    @property
    def dimensions(self) -> list[str]:
        """The meter dimensions to group by (``group_by`` without ``customer``)."""
        return [g for g in self.group_by if g != CUSTOMER]

    @property
    def per_customer(self) -> bool:
        return CUSTOMER in self.group_by


class UsageRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    window_start: datetime
    window_end: datetime
    customer: str | None = None
    group_by: dict[str, str] = Field(default_factory=dict)
    value: Decimal | None = None


class UsageResult(BaseModel):
    """The answer of ``GET /v1/meters/{slug}/usage``."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    meter: str
    aggregation: str
    from_: datetime = Field(
        validation_alias=AliasChoices("from_", "from"), serialization_alias="from"
    )
    to: datetime
    window: WindowSize | None = None
    tz: str = "UTC"
    data: list[UsageRow] = Field(default_factory=list)
