"""Tenants: the unit of isolation. Every row of every table carries its tenant_id."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

TENANT_ID_PATTERN = r"^[a-z2-7]{12}$"


class Tenant(BaseModel):
    model_config = ConfigDict(frozen=True)

    tenant_id: str
    name: str
    created_at: datetime
