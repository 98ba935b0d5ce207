"""Control messages on the events topic, next to event envelopes.

A control message is ``CONTROL_PREFIX`` followed by a JSON document::

    b"\\x00tally.control\\x00" {"v": 1, "kind": "activate_meter", "meter": {<Meter as JSON>}}

An envelope is a JSON object and starts with ``{``; a JSON text can never start with a NUL byte, so
the two are unambiguous and the worker tells them apart by the first byte (event decoding keeps
its speed). An unknown ``kind``, a bad version or a bad meter raise ``ControlError`` with a
``reason`` (``undecodable``, ``unsupported_version``, ``invalid_control``): the worker records the
message as a dead letter and goes on, like a poison envelope (it never crashes on it).

``activate_meter``: the API produces one to every partition of the topic when a meter is created;
the meter applies to the events after the first such marker in each partition
(docs/architecture.md, "Meter activation").
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pydantic

from schemas.meters import Meter

CONTROL_PREFIX = b"\x00tally.control\x00"
CONTROL_VERSION = 1
ACTIVATE_METER = "activate_meter"


class ControlError(ValueError):
    """A message that starts like a control message but is not a valid one. ``reason``: see
    ``schemas.deadletters``; ``tenant_id``: the meter's tenant when it could be read ('')."""

    def __init__(self, message: str, reason: str = "invalid_control", tenant_id: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.tenant_id = tenant_id


@dataclass(frozen=True, slots=True)
class ActivateMeter:
    """Start ``meter`` in the partition that carries this marker."""

    meter: Meter


Control = ActivateMeter


def is_control(payload: bytes) -> bool:
    return payload[:1] == b"\x00" and payload.startswith(CONTROL_PREFIX)


def encode_activate(meter: Meter) -> bytes:
    doc = {
        "v": CONTROL_VERSION,
        "kind": ACTIVATE_METER,
        "meter": meter.model_dump(mode="json", by_alias=False),
    }
    return CONTROL_PREFIX + orjson.dumps(doc)


def decode_control(payload: bytes) -> Control:
    """Decode a control message (``is_control(payload)`` must hold). Raises ControlError."""
    if not is_control(payload):
        raise ControlError("not a control message", "undecodable")
    try:
        doc = orjson.loads(payload[len(CONTROL_PREFIX) :])
    except orjson.JSONDecodeError as exc:
        raise ControlError(f"undecodable control message: {exc}", "undecodable") from None
    if not isinstance(doc, dict):
        raise ControlError("a control message must be a JSON object", "undecodable")
    raw_meter = doc.get("meter")
    tenant = raw_meter.get("tenant_id") if isinstance(raw_meter, dict) else None
    hint = tenant if isinstance(tenant, str) and 0 < len(tenant) <= 64 else ""
    version = doc.get("v")
    if type(version) is not int or version != CONTROL_VERSION:
        raise ControlError(
            f"unsupported control message version {version!r}", "unsupported_version", hint
        )
    kind = doc.get("kind")
    if kind != ACTIVATE_METER:
        raise ControlError(f"unknown control message kind {kind!r}", "invalid_control", hint)
    try:
        meter = Meter.model_validate(raw_meter)
    except pydantic.ValidationError as exc:
        raise ControlError(
            f"bad meter in activate_meter: {exc.errors()[0]['msg']}", "invalid_control", hint
        ) from None
    if not meter.activation_topic:
        raise ControlError(
            "activate_meter: the meter has no activation_topic", "invalid_control", hint
        )
    return ActivateMeter(meter)


__all__ = [
    "ACTIVATE_METER",
    "CONTROL_PREFIX",
    "ActivateMeter",
    "Control",
    "ControlError",
    "decode_control",
    "encode_activate",
    "is_control",
]
