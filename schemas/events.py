"""Usage events: the canonical internal form shared by api/, streams/ and clickhouse/."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.timeutil import parse_time

ID_MAX = 256


class Event(BaseModel):
    """One usage event, validated. ``time`` is aware UTC with ms precision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(
        min_length=1, max_length=ID_MAX, description="Idempotency key, unique per tenant"
    )
    type: str = Field(min_length=1, max_length=ID_MAX)
    customer: str = Field(min_length=1, max_length=ID_MAX, description="Customer external id")
    time: datetime
    properties: dict[str, Any] = Field(default_factory=dict)

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v: object) -> datetime:
        return parse_time(v)


class EventError(BaseModel):
    """One problem with one event of an ingest request (``index`` = its position)."""

    model_config = ConfigDict(frozen=True)

    index: int
    field: str
    message: str


class IngestResult(BaseModel):
    """The answer of ``POST /v1/events``: how many events were accepted (durable, or stored with
    ``wait=stored``) and what was wrong with each rejected one."""

    model_config = ConfigDict(frozen=True)

    accepted: int = 0
    rejected: list[EventError] = Field(default_factory=list)
