"""Pure mapping of Segment messages to Tally events (``/v1/batch``, ``/v1/track``, webhook). No I/O.

A ``track`` message becomes the row ``(id, type, customer, time_ms, properties)`` of the native
path (``api.ingest_parse``): ``messageId`` -> id (the dedupe key), ``event`` -> type,
``properties`` -> properties, ``timestamp`` (else ``originalTimestamp``, else the receive time)
-> time, and the customer is ``userId`` (else ``anonymousId``), or the value at the tenant's
``customer_property`` (e.g. ``context.groupId``). ``identify``, ``page``, ``screen``, ``group``
and ``alias`` messages are counted in ``ignored`` and produce nothing. Each problem is reported
as ``{index, field, message}``; the valid neighbours are kept. The same lateness bounds as native
ingest apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from api.ingest_parse import Limits, time_bounds_problem
from schemas.envelope import Row
from schemas.events import ID_MAX
from schemas.jsonpath import json_kind
from schemas.segment import IGNORED_TYPES
from schemas.timeutil import epoch_ms, parse_time

MAX_BATCH_BYTES = 500 * 1024  # Segment: 500 KB per batch request
MAX_MESSAGE_BYTES = 32 * 1024  # Segment: 32 KB per message (and per /v1/track request)
MAX_BATCH_MESSAGES = 2500  # Segment: 2500 messages per batch; the rest are rejected
_TYPES = ", ".join(["track", *sorted(IGNORED_TYPES)])


@dataclass(frozen=True, slots=True)
class CustomerRule:
    """Where a message's customer comes from. ``path`` None: userId, else anonymousId."""

    path: tuple[str, ...] | None = None
    fallback_to_user: bool = False

    @classmethod
    def of(cls, customer_property: str, fallback_to_user: bool) -> CustomerRule:
        if not customer_property:
            return cls()
        return cls(tuple(customer_property.split(".")), fallback_to_user)

    @property
    def label(self) -> str:
        return ".".join(self.path) if self.path else "userId"


@dataclass(slots=True)
class SegmentParse:
    rows: list[Row] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)  # the message index of each row
    errors: list[dict[str, Any]] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    total: int = 0

    @property
    def rejected(self) -> int:
        return len({e["index"] for e in self.errors})

    @property
    def n_ignored(self) -> int:
        return sum(self.ignored.values())


def _lookup(msg: dict[str, Any], path: tuple[str, ...], batch_context: dict[str, Any]) -> Any:
    cur: Any = msg
    for step in path:
        if not isinstance(cur, dict) or step not in cur:
            cur = None
            break
        cur = cur[step]
    if cur is None and path[0] == "context" and batch_context:
        # A batch-level context applies to every message that does not override it.
        return _lookup({"context": batch_context}, path, {})
    return cur


def _identifier(v: Any) -> str | None:
    """Segment ids are strings (SDKs stringify numbers): a non-empty string or an integer."""
    if isinstance(v, str):
        return v if v.strip() else None
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and v.is_integer() and abs(v) <= 2**53:  # JSON 7.0 is 7
        return str(int(v))
    return None


class _Message:
    """Validation of one message, collecting every problem."""

    __slots__ = ("errors", "index", "n")

    def __init__(self, index: int, errors: list[dict[str, Any]]) -> None:
        self.index = index
        self.errors = errors
        self.n = len(errors)

    def bad(self, name: str, message: str) -> None:
        self.errors.append({"index": self.index, "field": name, "message": message})

    @property
    def ok(self) -> bool:
        return len(self.errors) == self.n

    def string(self, msg: dict[str, Any], name: str) -> str | None:
        v = msg.get(name)
        if v is None:
            self.bad(name, f"{name} is required")
        elif not isinstance(v, str):
            self.bad(name, f"{name} must be a string, got {json_kind(v)}")
        elif not v:
            self.bad(name, f"{name} must not be empty")
        elif len(v) > ID_MAX:
            self.bad(name, f"{name} is longer than {ID_MAX} characters")
        else:
            return v
        return None

    def customer(
        self, msg: dict[str, Any], rule: CustomerRule, batch_context: dict[str, Any]
    ) -> str | None:
        if rule.path is not None:
            raw = _lookup(msg, rule.path, batch_context)
            if raw is not None:
                value = _identifier(raw)
                if value is None:
                    self.bad(
                        rule.label,
                        f"{rule.label} (this tenant's customer property) must be a non-empty "
                        f"string or an integer, got {json_kind(raw)}",
                    )
                    return None
                return self._length(rule.label, value)
            if not rule.fallback_to_user:
                self.bad(
                    rule.label,
                    f"{rule.label} is missing; this tenant bills Segment messages to the "
                    f"customer in {rule.label} (customer_property of /v1/segment/config)",
                )
                return None
        for name in ("userId", "anonymousId"):
            raw = msg.get(name)
            if raw is None:
                continue
            value = _identifier(raw)
            if value is None:
                self.bad(
                    name, f"{name} must be a non-empty string or an integer, got {json_kind(raw)}"
                )
                return None
            return self._length(name, value)
        self.bad("userId", "userId or anonymousId is required (it names the customer)")
        return None

    def _length(self, name: str, value: str) -> str | None:
        if len(value) > ID_MAX:
            self.bad(name, f"{name} is longer than {ID_MAX} characters")
            return None
        return value

    def time(self, msg: dict[str, Any], now_ms: int, limits: Limits) -> int | None:
        for name in ("timestamp", "originalTimestamp"):
            raw = msg.get(name)
            if raw is None:
                continue
            try:
                if isinstance(raw, float) and raw.is_integer():
                    raw = int(raw)
                ms = epoch_ms(parse_time(raw))
            except (ValueError, OverflowError) as exc:
                self.bad(name, f"invalid {name}: {exc}")
                return None
            problem = time_bounds_problem(ms, now_ms, limits, name)
            if problem is not None:
                self.bad(name, problem)
                return None
            return ms
        return now_ms  # no time of its own: when Tally received it


def parse_messages(
    messages: list[Any],
    *,
    now_ms: int,
    limits: Limits,
    rule: CustomerRule,
    batch_context: dict[str, Any] | None = None,
    implied_type: str | None = None,
    max_messages: int = MAX_BATCH_MESSAGES,
    max_message_bytes: int | None = MAX_MESSAGE_BYTES,
) -> SegmentParse:
    """Validate and map Segment messages. ``implied_type``: the endpoint fixes the type
    (``/v1/track``); ``max_message_bytes`` None: the caller already bounded each message."""
    res = SegmentParse(total=len(messages))
    errors = res.errors
    context = batch_context if isinstance(batch_context, dict) else {}
    for index, msg in enumerate(messages):
        m = _Message(index, errors)
        if index >= max_messages:
            m.bad(
                "batch",
                f"a batch holds at most {max_messages} messages (Segment's limit); "
                "this one was not accepted",
            )
            continue
        if not isinstance(msg, dict):
            m.bad("message", f"a message must be a JSON object, got {json_kind(msg)}")
            continue
        if max_message_bytes is not None:
            try:
                size = len(orjson.dumps(msg))
            except orjson.JSONEncodeError:
                m.bad("message", "the message is nested too deeply (at most 254 levels)")
                continue
            if size > max_message_bytes:
                m.bad(
                    "message",
                    f"the message is {size} bytes; the limit is {max_message_bytes} bytes "
                    "per message (Segment's 32 KB)",
                )
                continue
        kind = implied_type
        if kind is None:
            raw_type = msg.get("type")
            if not isinstance(raw_type, str) or not raw_type:
                m.bad("type", f"type is required: one of {_TYPES}")
                continue
            kind = raw_type.lower()
        if kind in IGNORED_TYPES:
            res.ignored[kind] = res.ignored.get(kind, 0) + 1
            continue
        if kind != "track":
            m.bad("type", f"unknown message type {kind!r}; expected one of {_TYPES}")
            continue
        ev_id = m.string(msg, "messageId")
        ev_type = m.string(msg, "event")
        customer = m.customer(msg, rule, context)
        props = msg.get("properties")
        if props is None:
            props = {}
        elif not isinstance(props, dict):
            m.bad("properties", f"properties must be an object, got {json_kind(props)}")
        t = m.time(msg, now_ms, limits)
        if not m.ok:
            continue
        assert ev_id is not None and ev_type is not None and customer is not None and t is not None
        res.rows.append((ev_id, ev_type, customer, t, props))
        res.indexes.append(index)
    return res


def summary(res: SegmentParse, limit: int = 5) -> str:
    parts = [f"[{e['index']}] {e['field']}: {e['message']}" for e in res.errors[:limit]]
    more = f" (and {len(res.errors) - limit} more)" if len(res.errors) > limit else ""
    return f"{res.rejected} of {res.total} messages are invalid: " + "; ".join(parts) + more
