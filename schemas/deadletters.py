"""Dead letters: messages and events of the events topic the worker cannot use.

The worker never stops on a bad message: it records it as a dead letter, commits its offset like
any other message and goes on (the partition is never blocked). A dead letter keeps where it came
from (topic, partition, offset, index in the envelope; index -1 = the whole message), why
(``reason``, below), the tenant when it could be read, and the raw payload (at most
``dead_letter_max_payload_bytes``), so it can be re-driven after a fix.

Reasons:

- ``empty_message``: a message without a value (a tombstone);
- ``undecodable``: not JSON, or not a JSON object (also a control message whose JSON is broken);
- ``unsupported_version``: an envelope or control message of another wire version (e.g. written
  by a newer API during a rolling upgrade): re-drive it once the workers run that version;
- ``invalid_envelope``: a version-1 envelope whose ``t``, ``at`` or ``e`` is unusable;
- ``invalid_event``: one event of a good envelope (``index``) that cannot be stored: a field of
  the wrong type, empty or too long, a time outside the store's range, properties nested deeper
  than the encoder allows; its neighbours are stored;
- ``invalid_control``: a control message of an unknown kind or with a bad meter;
- ``meter_value``: the event IS stored (and counted by its other meters) but meter ``meter_id``
  could not use its value (missing, not a number, out of range). Informational: it cannot be
  re-driven (dedupe would drop the copy); correct the event (``POST /v1/events/{id}/corrections``)
  or fix the meter and backfill.

Row identity: ``dead_letter_id(topic, partition, offset, index, meter_id)`` -- deterministic, so a
replayed flush writes the same row again (the table collapses it), like the activation rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

EMPTY_MESSAGE = "empty_message"
UNDECODABLE = "undecodable"
UNSUPPORTED_VERSION = "unsupported_version"
INVALID_ENVELOPE = "invalid_envelope"
INVALID_EVENT = "invalid_event"
INVALID_CONTROL = "invalid_control"
METER_VALUE = "meter_value"

REASONS = (
    EMPTY_MESSAGE,
    UNDECODABLE,
    UNSUPPORTED_VERSION,
    INVALID_ENVELOPE,
    INVALID_EVENT,
    INVALID_CONTROL,
    METER_VALUE,
)
# Reasons whose payload can be produced again once the cause is fixed.
REDRIVABLE = frozenset(REASONS) - {METER_VALUE, EMPTY_MESSAGE}

WHOLE_MESSAGE = -1  # the index of a dead letter that is a whole message
MESSAGE_MAX = 1000  # characters of the human-readable problem kept

# Column order of the ``dead_letters`` table (clickhouse.deadletters writes these tuples).
DEAD_LETTER_COLUMNS = [
    "tenant_id",
    "dead_letter_id",
    "reason",
    "message",
    "source_topic",
    "source_partition",
    "source_offset",
    "source_index",
    "event_id",
    "meter_id",
    "payload",
    "payload_bytes",
    "payload_truncated",
    "produced_at_ms",
]

# (tenant_id, dead_letter_id, reason, message, topic, partition, offset, index, event_id,
#  meter_id, payload (bytes), payload_bytes, payload_truncated (0/1), produced_at_ms (-1: unknown))
DeadLetterRow = tuple[str, str, str, str, str, int, int, int, str, str, bytes, int, int, int]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A problem found in one message (``index`` -1) or one event of it."""

    reason: str
    message: str
    payload: bytes
    tenant_id: str = ""
    index: int = WHOLE_MESSAGE
    event_id: str = ""
    meter_id: str = ""


def dead_letter_id(topic: str, partition: int, offset: int, index: int, meter_id: str = "") -> str:
    """The deterministic id of the dead letter at a source position."""
    key = f"{topic}\x00{partition}\x00{offset}\x00{index}\x00{meter_id}".encode()
    return "dl_" + hashlib.sha256(key).hexdigest()[:24]


def row(
    dl: DeadLetter,
    topic: str,
    partition: int,
    offset: int,
    produced_at_ms: int | None,
    max_payload_bytes: int,
) -> DeadLetterRow:
    """The table row of ``dl`` found at (topic, partition, offset); the payload is cut to
    ``max_payload_bytes`` (a cut payload cannot be re-driven)."""
    payload = dl.payload
    size = len(payload)
    truncated = size > max_payload_bytes
    return (
        dl.tenant_id,
        dead_letter_id(topic, partition, offset, dl.index, dl.meter_id),
        dl.reason,
        dl.message[:MESSAGE_MAX],
        topic,
        int(partition),
        int(offset),
        int(dl.index),
        dl.event_id,
        dl.meter_id,
        payload[:max_payload_bytes] if truncated else payload,
        size,
        1 if truncated else 0,
        -1 if produced_at_ms is None else int(produced_at_ms),
    )


__all__ = [
    "DEAD_LETTER_COLUMNS",
    "EMPTY_MESSAGE",
    "INVALID_CONTROL",
    "INVALID_ENVELOPE",
    "INVALID_EVENT",
    "METER_VALUE",
    "REASONS",
    "REDRIVABLE",
    "UNDECODABLE",
    "UNSUPPORTED_VERSION",
    "WHOLE_MESSAGE",
    "DeadLetter",
    "DeadLetterRow",
    "dead_letter_id",
    "row",
]
