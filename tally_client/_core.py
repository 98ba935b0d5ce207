"""What the sync and async clients share: the retry policy, event building, request specs and
answer parsing. No I/O here; ``client.py`` and ``aio.py`` send the requests."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import orjson
from pydantic import BaseModel

from schemas.events import EventError, IngestResult
from tally_client.errors import ApiError, PayloadTooLargeError, error_for

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

EVENTS_PATH = "/v1/events"
MAX_BATCH = 1000  # the server's default max_events_per_request
USER_AGENT = "tally-client-python/0.1"
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


# --- retries -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How a request is retried.

    Retried: connection errors, timeouts and lost answers, and the statuses in
    ``RETRYABLE_STATUS`` (429 and 5xx such as 503 "broker down"). The wait before attempt ``n+1``
    is the server's ``Retry-After`` when it sent one (capped at ``max_retry_after``), else an
    exponential backoff ``initial_backoff * 2**(n-1)`` (at most ``max_backoff``) with jitter.
    It gives up after ``max_attempts`` attempts or once ``max_elapsed`` seconds have passed.
    Ingest retries resend the very same events (same ids): the server counts each id once.
    Requests that create something without an id of their own (e.g. a subscription) are only
    retried when they surely did not reach the server (connection refused, 429).
    """

    max_attempts: int = 10
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    max_elapsed: float = 300.0
    max_retry_after: float = 300.0

    def backoff(self, attempt: int) -> float:
        base = min(self.max_backoff, self.initial_backoff * (2 ** max(0, attempt - 1)))
        return base / 2 + random.uniform(0, base / 2)

    def wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        return self.backoff(attempt)

    def gives_up(self, attempt: int, started: float, wait: float) -> bool:
        return attempt >= self.max_attempts or time.monotonic() - started + wait > self.max_elapsed


NO_RETRIES = RetryPolicy(max_attempts=1)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: an integer, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(int(value)))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# --- events ------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return iso_time(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"cannot send a {type(value).__name__} as JSON")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_json_default)


def iso_time(value: datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("event time must be timezone-aware (e.g. datetime.now(UTC))")
    value = value.astimezone(UTC)
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_event_id() -> str:
    return str(uuid.uuid4())


def build_event(
    type: str,
    customer: str,
    properties: Mapping[str, Any] | None = None,
    *,
    id: str | None = None,
    time: datetime | str | int | None = None,
) -> dict[str, Any]:
    """A native event as sent. The id and the time are fixed now (default: a new UUID, the
    current time), so every retry sends the same event."""
    if not isinstance(type, str) or not type:
        raise ValueError("type must be a non-empty string")
    if not isinstance(customer, str) or not customer:
        raise ValueError("customer must be a non-empty string")
    if time is None:
        when: str | int = iso_time(datetime.now(UTC))
    elif isinstance(time, datetime):
        when = iso_time(time)
    elif isinstance(time, str | int) and not isinstance(time, bool):
        when = time
    else:
        raise ValueError("time must be an aware datetime, an RFC 3339 string or epoch ms")
    return {
        "id": id or new_event_id(),
        "type": type,
        "customer": customer,
        "time": when,
        "properties": dict(properties or {}),
    }


def as_event(event: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    """A caller's event (dict or ``schemas.events.Event``) as sent; an id is required."""
    doc = event.model_dump(mode="json") if isinstance(event, BaseModel) else dict(event)
    if not doc.get("id"):
        raise ValueError(
            "every event needs an id (the idempotency key that makes retries safe); "
            "use track() to have one generated"
        )
    if isinstance(doc.get("time"), datetime):
        doc["time"] = iso_time(doc["time"])
    return doc


def chunks(items: Sequence[T], size: int) -> Iterable[tuple[int, Sequence[T]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def merge_results(parts: list[tuple[int, IngestResult]]) -> IngestResult:
    """Results of consecutive chunks -> one result with indexes into the whole input."""
    accepted = 0
    rejected: list[EventError] = []
    for offset, res in parts:
        accepted += res.accepted
        rejected += [e.model_copy(update={"index": e.index + offset}) for e in res.rejected]
    return IngestResult(accepted=accepted, rejected=rejected)


def ingest_answer(status: int, body: Any) -> IngestResult | None:
    """An ingest answer as a result: 2xx, or a 400 listing the bad events (none accepted)."""
    if 200 <= status < 300:
        if status == 204 or not isinstance(body, dict):
            return IngestResult()
        return IngestResult.model_validate(body)
    details = body.get("details") if isinstance(body, dict) else None
    if (
        status == 400
        and isinstance(details, list)
        and details
        and all(isinstance(d, dict) and "index" in d for d in details)
        and not str(body.get("message", "")).startswith("atomic")
    ):
        return IngestResult(accepted=0, rejected=[EventError.model_validate(d) for d in details])
    return None


def split_on_413(exc: ApiError, size: int) -> bool:
    return isinstance(exc, PayloadTooLargeError) and size > 1


def ingest_call(events: list[dict[str, Any]], wait: str | None) -> Call[IngestResult]:
    """``POST /v1/events`` for events that carry their ids: always safe to resend."""

    def parse(data: Any) -> IngestResult:
        result = ingest_answer(202, data)
        assert result is not None
        return result

    return Call(
        "POST",
        EVENTS_PATH,
        parse,
        params=[("wait", wait)] if wait else [],
        body=events,
        recover=ingest_answer,
    )


def rejected_error(result: IngestResult) -> ApiError:
    first = result.rejected[0] if result.rejected else None
    hint = f"; first: [{first.index}] {first.field}: {first.message}" if first else ""
    return ApiError(
        400,
        "invalid_request",
        f"{len({e.index for e in result.rejected})} events were rejected{hint}",
        [e.model_dump() for e in result.rejected],
    )


# --- request specs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request and how to read its answer. ``idempotent``: safe to resend whatever
    happened to the first attempt."""

    method: str
    path: str
    parse: Callable[[Any], T]
    params: list[tuple[str, str]] = field(default_factory=list)
    body: Any = None
    idempotent: bool = True
    # An error answer that is really a result (ingest: a 400 listing every event as invalid).
    recover: Callable[[int, Any], T | None] | None = None


def seg(value: str) -> str:
    """A path segment, escaped (customer ids may hold '/', spaces, ...)."""
    return quote(str(value), safe="")


def body_of(value: Any) -> Any:
    """A request body: a pydantic model (only the fields that were set) or plain data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    return value


def model(cls: type[M]) -> Callable[[Any], M]:
    """Parse an answer into ``cls``, ignoring fields a newer server may add."""

    def parse(data: Any) -> M:
        if isinstance(data, dict):
            known = set(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}
            known |= {
                a
                for f in cls.model_fields.values()
                for a in getattr(f.validation_alias, "choices", ())
                if isinstance(a, str)
            }
            data = {k: v for k, v in data.items() if k in known}
        return cls.model_validate(data)

    return parse


def model_list(cls: type[M]) -> Callable[[Any], list[M]]:
    one = model(cls)

    def parse(data: Any) -> list[M]:
        items = data.get("data", []) if isinstance(data, dict) else data
        return [one(x) for x in items]

    return parse


def nothing(_data: Any) -> None:
    return None


def raw(data: Any) -> Any:
    return data


def decode(status: int, content: bytes, headers: Mapping[str, str]) -> Any:
    if not content:
        return None
    ctype = headers.get("content-type", "")
    if "json" in ctype:
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            return None
    return content.decode("utf-8", "replace")


def answer_error(status: int, data: Any, headers: Mapping[str, str], text: str) -> ApiError:
    return error_for(status, data, parse_retry_after(headers.get("retry-after")), text[:500])


def usage_params(
    from_: datetime | str | None,
    to: datetime | str | None,
    window: str | None,
    tz: str | None,
    customers: Iterable[str],
    group_by: Iterable[str],
    filters: Mapping[str, str | Iterable[str]] | None,
) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    for name, value in (("from", from_), ("to", to)):
        if value is not None:
            params.append((name, iso_time(value) if isinstance(value, datetime) else str(value)))
    if window:
        params.append(("window", window.upper()))
    if tz:
        params.append(("tz", tz))
    params += [("customer", c) for c in customers]
    params += [("group_by", g) for g in group_by]
    for dim, values in (filters or {}).items():
        for v in [values] if isinstance(values, str) else values:
            params.append((f"filter[{dim}]", v))
    return params
