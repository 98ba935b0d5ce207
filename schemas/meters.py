"""Meter definitions. A meter turns matching events into a per-window number."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.jsonpath import compile_path

SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
NUMBER_LIMIT = Decimal(10) ** 29  # the store's Decimal(38, 9) holds 29 integer digits


class Aggregation(StrEnum):
    COUNT = "count"
    SUM = "sum"
    MIN = "min"
    MAX = "max"
    AVG = "avg"
    UNIQUE_COUNT = "unique_count"
    LATEST = "latest"

    @classmethod
    def _missing_(cls, value: object) -> Aggregation | None:
        # Accept OpenMeter's upper-case names (SUM, UNIQUE_COUNT, ...).
        if isinstance(value, str):
            low = value.lower()
            for member in cls:
                if member.value == low:
                    return member
        return None


class MeterStatus(StrEnum):
    """``pending``: stored, its activation markers not all acknowledged yet; ``active``: done."""

    PENDING = "pending"
    ACTIVE = "active"


class FilterOp(StrEnum):
    EQ = "eq"
    NE = "ne"
    IN = "in"
    NIN = "nin"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    EXISTS = "exists"


class PropertyFilter(BaseModel):
    """Keep an event only if the value at ``property`` satisfies ``op value``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    property: str
    op: FilterOp = FilterOp.EQ
    value: Any = None

    @field_validator("property")
    @classmethod
    def _path(cls, v: str) -> str:
        compile_path(v)
        return v

    @model_validator(mode="after")
    def _value(self) -> PropertyFilter:
        if self.op in (FilterOp.IN, FilterOp.NIN) and not isinstance(self.value, list):
            raise ValueError(f"filter op '{self.op}' needs a list value")
        if self.op in (FilterOp.GT, FilterOp.GTE, FilterOp.LT, FilterOp.LTE):
            # the worker's rule for numbers (streams.matching.to_decimal): finite, |v| < 1e29
            value = self.value.strip() if isinstance(self.value, str) else self.value
            try:
                if isinstance(value, bool) or value is None:
                    raise ValueError("not a number")
                number = Decimal(str(value))
            except Exception as exc:
                raise ValueError(f"filter op '{self.op}' needs a numeric value") from exc
            if not number.is_finite() or abs(number) >= NUMBER_LIMIT:
                raise ValueError(
                    f"filter op '{self.op}' needs a finite number below 1e29 in magnitude"
                )
        if self.op == FilterOp.EXISTS and not isinstance(self.value, bool | None):
            raise ValueError("filter op 'exists' takes true/false")
        return self


class MeterSpec(BaseModel):
    """What a client sends to create a meter (also the YAML format). camelCase aliases accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    slug: str = Field(pattern=SLUG_PATTERN)
    name: str | None = Field(None, max_length=256)
    description: str | None = Field(None, max_length=2048)
    event_type: str = Field(alias="eventType", min_length=1, max_length=256)
    aggregation: Aggregation
    value_property: str | None = Field(None, alias="valueProperty")
    group_by: dict[str, str] = Field(default_factory=dict, alias="groupBy")
    filters: list[PropertyFilter] = Field(default_factory=list)

    @field_validator("value_property")
    @classmethod
    def _vp(cls, v: str | None) -> str | None:
        if v is not None:
            compile_path(v)
        return v

    @field_validator("group_by")
    @classmethod
    def _gb(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > 20:
            raise ValueError("at most 20 group_by dimensions")
        for name, path in v.items():
            if not name or len(name) > 64:
                raise ValueError(f"group_by name {name!r} must be 1..64 characters")
            try:
                compile_path(path)
            except ValueError as exc:
                raise ValueError(f"group_by[{name}]: {exc}") from exc
        return v

    @model_validator(mode="after")
    def _value_required(self) -> MeterSpec:
        if self.aggregation != Aggregation.COUNT and not self.value_property:
            raise ValueError(f"value_property is required for aggregation '{self.aggregation}'")
        return self


class Meter(MeterSpec):
    """A stored meter. ``id`` is unique per creation (re-creating a slug gives a new id).

    ``activation_topic``: the events topic whose activation markers start the meter (see
    docs/architecture.md, "Meter activation"); empty for a meter stored without markers (older
    versions, tests), which applies to every event. ``status``: ``pending`` until the markers were
    acknowledged on every partition, then ``active``.
    """

    id: str
    tenant_id: str
    created_at: datetime
    status: MeterStatus = MeterStatus.ACTIVE
    activation_topic: str = ""

    def spec(self) -> MeterSpec:
        """The definition alone (what a client sent to create it)."""
        return MeterSpec.model_validate(self.model_dump(include=set(MeterSpec.model_fields)))
