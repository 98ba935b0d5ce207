"""The one error hierarchy. ``api.errors`` maps it to HTTP in one place.

Every error carries a machine-readable ``code``, a human message and optional ``details``
(e.g. a per-event list naming index and field). Raise these from any layer; never raise
HTTPException outside api/errors.py.
"""

from __future__ import annotations

from typing import Any


class TallyError(Exception):
    """Base class. ``status`` is the HTTP status the API maps it to."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body


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


class NotConfigured(TallyError):
    """The server lacks a setting the request needs (an operator must fix it; not retryable)."""

    status = 503
    code = "not_configured"


class Unavailable(TallyError):
    """A dependency (broker, store) is down; the client should retry after ``retry_after`` s."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.retry_after = retry_after


class BrokerUnavailable(Unavailable):
    code = "broker_unavailable"


class StoreUnavailable(Unavailable):
    code = "store_unavailable"


class BackPressure(TallyError):
    """Raised by a sink to pause consumption instead of dropping data (never reaches HTTP)."""

    status = 503
    code = "back_pressure"
