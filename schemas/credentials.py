"""Request bodies of the key, admin-token and limits endpoints (validated, unknown keys refused)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from schemas.jsonschema import TIME_IN, JsonInt
from schemas.timeutil import parse_time

MAX_NAME = 128
NO_CONTROL = "^[^\\u0000-\\u001f]*$"  # names are shown in lists and logs: no control characters
MAX_OVERLAP_S = 30 * 86_400
DEFAULT_OVERLAP_S = 3600


def _time(value: object) -> object:
    return None if value is None else parse_time(value)


class KeyIn(BaseModel):
    """``POST /v1/api-keys``: all optional."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=MAX_NAME, json_schema_extra={"pattern": NO_CONTROL})
    expires_at: Annotated[datetime, WithJsonSchema(TIME_IN, mode="validation")] | None = Field(
        None, description="RFC 3339 with offset, or epoch ms; must be in the future"
    )

    _t = field_validator("expires_at", mode="before")(_time)


class RotateIn(KeyIn):
    """``POST /v1/api-keys/{id}/rotate``: the old key keeps working for ``overlap_s``."""

    overlap_s: JsonInt = Field(DEFAULT_OVERLAP_S, ge=0, le=MAX_OVERLAP_S)


class AdminTokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=MAX_NAME, json_schema_extra={"pattern": NO_CONTROL})


class LimitsIn(BaseModel):
    """``PUT /v1/admin/tenants/{id}/limits``: null/absent = the default, 0 = unlimited."""

    model_config = ConfigDict(extra="forbid")

    requests_per_second: float | None = Field(None, ge=0, le=1e9, allow_inf_nan=False, strict=True)
    events_per_second: float | None = Field(None, ge=0, le=1e12, allow_inf_nan=False, strict=True)
    max_batch_events: Annotated[JsonInt, Field(ge=0, le=10**9)] | None = None
    monthly_events: Annotated[JsonInt, Field(ge=0, le=10**18)] | None = None
