"""The one error hierarchy. ``api.errors`` maps it to HTTP in one place.

Every error carries a machine-readable ``code``, a human ``message`` and ``details``: ALWAYS a
list of ``{"field": str, "message": str}`` objects (possibly empty). The HTTP body of every
4xx/5xx answer is exactly ``TallyError.to_dict()``::

    {"error": "<code>", "message": "<text>", "details": [{"field": "...", "message": "..."}]}

How to raise (any layer; never raise HTTPException outside api/errors.py)::

    from tally.errors import NotFound, ValidationError, detail

    raise NotFound(f"meter {slug!r} not found", details=[detail("slug", "unknown meter")])
    raise ValidationError("quantity must be >= 0", field="quantity")  # details: that one field

    try:
        spec = MeterSpec.model_validate(doc)
    except pydantic.ValidationError as exc:
        raise ValidationError.from_pydantic(exc, "invalid meter") from None

``pydantic_details(exc, prefix="")`` is THE converter of pydantic errors (pydantic's
``ValidationError``, FastAPI's ``RequestValidationError`` or a plain list of pydantic error dicts)
into ``[{field, message}]``: locations are joined with dots (``charges.0.price``), request
locations (``body``, ``query``, ``path``, ...) are dropped, ``prefix`` is prepended, and a
model-level error whose message starts with a field path (``"Value error, currency: ..."``) is
attributed to that field. ``summarize(details)`` makes a one-line message out of them.

A detail may carry extra keys (ingest adds ``index``, the position of the bad event in the
batch), but ``field`` and ``message`` are always there and always strings. For safety the
constructor also accepts a single mapping and turns it into a one-element list; new code passes a
list.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

Detail = dict[str, Any]

_REQUEST_LOCATIONS = ("body", "query", "path", "header", "cookie")
_NAMED = re.compile(r"^(?:Value error, )?([A-Za-z_][A-Za-z0-9_]*(?:\[\d+\]|\.[A-Za-z0-9_]+)*): ")


def detail(field: str, message: str, **extra: Any) -> Detail:
    """One ``{field, message}`` entry (extra keys, e.g. ``index``, are kept)."""
    return {"field": str(field), "message": str(message), **extra}


def normalize_details(details: Any, default_message: str = "invalid value") -> list[Detail]:
    """``details`` as a list of ``{field, message, ...}`` dicts with string field and message."""
    if details is None:
        return []
    items: Iterable[Any] = [details] if isinstance(details, Mapping) else details
    if isinstance(items, str | bytes):
        return [detail("body", str(items))]
    out: list[Detail] = []
    for item in items:
        if isinstance(item, Mapping):
            d = {str(k): v for k, v in item.items()}
            field = d.pop("field", None)
            message = d.pop("message", None)
            out.append(
                detail(
                    "body" if field is None or field == "" else str(field),
                    default_message if message is None else str(message),
                    **d,
                )
            )
        else:
            out.append(detail("body", str(item)))
    return out


def summarize(details: list[Detail], fallback: str = "invalid request") -> str:
    """``"field: message; field: message"`` (or ``fallback`` when there is nothing)."""
    return "; ".join(f"{d['field']}: {d['message']}" for d in details) or fallback


def _refine(field: str, message: str, prefix: str) -> str:
    """A model-level error whose message names a field path (``"Value error, currency: ..."``)
    is attributed to that field, below the model's own location."""
    m = _NAMED.match(message)
    if m:
        path = re.sub(r"\[(\d+)\]", r".\1", m.group(1))
        base = "" if field == "body" else field
        if not base:
            return f"{prefix}.{path}" if prefix else path
        if base.rsplit(".", 1)[-1] != path.split(".", 1)[0]:
            return f"{base}.{path}"
    return field or prefix or "body"


def pydantic_details(errors: Any, prefix: str = "") -> list[Detail]:
    """THE converter: pydantic / FastAPI validation errors -> ``[{field, message}]``.

    ``errors`` is an exception with an ``errors()`` method or a list of pydantic error dicts.
    """
    if hasattr(errors, "errors"):
        try:
            raw = errors.errors(include_url=False)
        except TypeError:  # FastAPI's RequestValidationError.errors() takes no arguments
            raw = errors.errors()
    else:
        raw = errors
    out: list[Detail] = []
    for err in raw or ():
        if err.get("type") == "json_invalid":
            out.append(detail("body", "request body is not valid JSON"))
            continue
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in _REQUEST_LOCATIONS:
            loc = loc[1:]
        path = ".".join(loc)
        field = f"{prefix}.{path}" if prefix and path else (prefix or path)
        message = str(err.get("msg", "invalid value"))
        out.append(detail(_refine(field, message, prefix), message))
    return out


class TallyError(Exception):
    """Base class. ``status`` is the HTTP status the API maps it to."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, details: Any = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if field is not None and details is None:
            details = [detail(field, message)]
        self.details: list[Detail] = normalize_details(details, message)

    @classmethod
    def from_pydantic(cls, exc: Any, what: str, prefix: str = "") -> TallyError:
        """``cls("<what>: <summary>", details=pydantic_details(exc, prefix))``."""
        details = pydantic_details(exc, prefix)
        return cls(f"{what}: {summarize(details)}", details=details)

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "details": self.details}


class ValidationError(TallyError):
    """Input is malformed or violates a rule; ``details`` names the field(s)."""

    status = 400
    code = "invalid_request"


class AuthenticationError(TallyError):
    status = 401
    code = "unauthorized"


class PermissionDenied(TallyError):
    status = 403
    code = "forbidden"


class NotFound(TallyError):
    status = 404
    code = "not_found"


class Conflict(TallyError):
    """E.g. an illegal subscription transition or an existing slug."""

    status = 409
    code = "conflict"


class PayloadTooLarge(TallyError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(TallyError):
    """The request's Content-Type is not one the endpoint accepts."""

    status = 415
    code = "unsupported_media_type"


class Retryable(TallyError):
    """An error the client should retry after ``retry_after`` seconds (``Retry-After`` header)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: int = 5,
        details: Any = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, details=details, field=field)
        self.retry_after = retry_after


class RateLimited(Retryable):
    """A rate limit (per tenant, or failed authentications per client address) was exceeded.

    ``details`` names the limit: ``[{"field": "<limit name>", "message": ...}]``.
    """

    status = 429
    code = "rate_limited"


class QuotaExceeded(RateLimited):
    """A tenant's monthly event quota is used up (``details`` field ``monthly_events``)."""

    code = "quota_exceeded"


class NotConfigured(TallyError):
    """The server lacks a setting the request needs (an operator must fix it; not retryable)."""

    status = 503
    code = "not_configured"


class Unavailable(Retryable):
    """A dependency (broker, store) is down; the client should retry after ``retry_after`` s."""

    status = 503
    code = "unavailable"


class Overloaded(Unavailable):
    """The process sheds load (too many requests or events in flight); retry later."""

    code = "overloaded"


class BrokerUnavailable(Unavailable):
    code = "broker_unavailable"


class StoreUnavailable(Unavailable):
    code = "store_unavailable"


class BackPressure(TallyError):
    """Raised by a sink to pause consumption instead of dropping data (never reaches HTTP)."""

    status = 503
    code = "back_pressure"
