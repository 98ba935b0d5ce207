"""Segment sources: the per-tenant settings and the answers of the Segment endpoints.

A Segment ``track`` message becomes one Tally event (see docs/ingest.md): ``messageId`` -> id,
``event`` -> type, ``properties`` -> properties, ``timestamp`` (else ``originalTimestamp``,
else the receive time) -> time, and the customer is ``userId`` (else ``anonymousId``) unless the
tenant maps it from another field (``customer_property``, e.g. ``context.groupId`` or
``properties.account_id`` for B2B billing).
"""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.jsonschema import JsonInt

_STRICT = ConfigDict(extra="forbid", frozen=True)

# A dotted path into a Segment message: ``context.groupId``, ``properties.account_id``,
# ``context.traits.account_id``. A leading ``$.`` (the meters' JSONPath style) is accepted.
PROPERTY_PATH = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$-]*(?:\.[A-Za-z_$][A-Za-z0-9_$-]*){0,7}$")
SECRET_MIN = 16
SECRET_MAX = 256
MAX_PREVIOUS_VALID_S = 30 * 86_400
DEFAULT_PREVIOUS_VALID_S = 86_400

# Message types that are accepted and ignored (counted in tally_segment_messages_ignored).
IGNORED_TYPES = frozenset({"identify", "page", "screen", "group", "alias"})


def normalize_property(value: str) -> str:
    """``$.context.groupId`` / ``context.groupId`` -> ``context.groupId``; ValueError if invalid."""
    path = value.strip()
    if path.startswith("$."):
        path = path[2:]
    if not PROPERTY_PATH.match(path):
        raise ValueError(
            "must be a dotted path into the message such as 'context.groupId' or "
            "'properties.account_id' (letters, digits, _ $ -; at most 8 levels)"
        )
    return path


class SegmentConfigIn(BaseModel):
    """``PUT /v1/segment/config``. ``customer_property`` null (or empty): the customer is
    ``userId``, else ``anonymousId``. With a property, a message without it is rejected unless
    ``fallback_to_user_id`` is true."""

    model_config = _STRICT

    customer_property: str | None = Field(
        default=None,
        max_length=256,
        json_schema_extra={
            "pattern": r"^\s*((\$\.)?[A-Za-z_$][A-Za-z0-9_$-]*(\.[A-Za-z_$][A-Za-z0-9_$-]*){0,7})?\s*$"
        },
    )
    fallback_to_user_id: bool = Field(default=False, strict=True)

    @field_validator("customer_property")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        return normalize_property(v)


class WebhookSecretIn(BaseModel):
    """``POST /v1/segment/webhook-secret``: set (or rotate) the shared secret of the webhook
    destination. Without ``secret`` a strong one is generated and returned once. The secret it
    replaces keeps verifying for ``previous_valid_for_s`` seconds (0 = stops at once), so that
    Segment can be switched over without losing deliveries."""

    model_config = _STRICT

    secret: str | None = Field(
        default=None,
        min_length=SECRET_MIN,
        max_length=SECRET_MAX,
        json_schema_extra={"pattern": r"^[!-~]([ -~]*[!-~])?$"},
    )
    previous_valid_for_s: JsonInt = Field(
        default=DEFAULT_PREVIOUS_VALID_S, ge=0, le=MAX_PREVIOUS_VALID_S
    )

    @field_validator("secret")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and (not v.isascii() or not v.isprintable() or v != v.strip()):
            raise ValueError("must be printable ASCII without leading or trailing blanks")
        return v


class SegmentWebhook(BaseModel):
    model_config = ConfigDict(frozen=True)

    enabled: bool
    path: str = Field(description="POST here (one message per request, signed with X-Signature)")
    secret_set_at: datetime | None = None
    previous_secret_valid_until: datetime | None = None


class SegmentConfig(BaseModel):
    """``GET /v1/segment/config``. Never contains a secret."""

    model_config = ConfigDict(frozen=True)

    customer_property: str | None = None
    fallback_to_user_id: bool = False
    webhook: SegmentWebhook


class WebhookSecretOut(BaseModel):
    model_config = ConfigDict(frozen=True)

    secret: str | None = Field(default=None, description="Only when generated: shown once")
    webhook: SegmentWebhook


class SegmentAnswer(BaseModel):
    """The answer of ``/v1/batch``, ``/v1/track`` and the webhook: Segment's ``success`` plus
    what happened to each message."""

    model_config = ConfigDict(frozen=True)

    success: bool = True
    accepted: int = 0
    ignored: int = 0
    rejected: list[dict[str, object]] = Field(default_factory=list)
