"""What the Tally client raises. Every class derives from ``TallyClientError``."""

from __future__ import annotations

from typing import Any


class TallyClientError(Exception):
    """Base class of every error raised by ``tally_client``."""


class ApiError(TallyClientError):
    """The server answered with an error (after the retries, for retryable ones).

    ``status`` is the HTTP status, ``code`` Tally's error code (e.g. ``invalid_request``),
    ``details`` the list of ``{field, message}`` (or ``{index, field, message}``) it gave.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after


class BadRequestError(ApiError):
    """400: the request is invalid; ``details`` names the fields. Not retried."""


class AuthenticationError(ApiError):
    """401: the API key is missing, unknown or revoked."""


class NotFoundError(ApiError):
    """404."""


class ConflictError(ApiError):
    """409, e.g. a meter slug or customer id that exists already."""


class PayloadTooLargeError(ApiError):
    """413: too many events or bytes in one request (``ingest`` splits and retries itself)."""


class RateLimitedError(ApiError):
    """429 that persisted through the retries."""


class UnavailableError(ApiError):
    """5xx (e.g. 503 broker down) that persisted through the retries."""


class ConnectionFailedError(TallyClientError):
    """The server could not be reached (or the answer was lost) through all the retries.

    For ingest this does not mean the events were lost by Tally: resending them is safe because
    events are deduplicated by id, which is what the client's retries do.
    """


class QueueFullError(TallyClientError):
    """``track()`` found the client's in-memory queue full: the server is slow or unreachable.

    Nothing was queued. Handle it (wait and call ``track`` again, or ``flush()``), or raise
    ``max_queue_size`` -- the client never drops events silently.
    """


class ClientClosedError(TallyClientError):
    """The client was closed; create a new one."""


class DeliveryError(TallyClientError):
    """Events queued with ``track()`` that could not be delivered (raised by ``flush``/``close``).

    ``failures`` is a list of ``(error, events)``: the error, and the events (dicts as sent) it
    concerns -- rejected by validation (not retryable), or given up on after the retries.
    """

    def __init__(self, failures: list[tuple[Exception, list[dict[str, Any]]]]) -> None:
        n = sum(len(evs) for _, evs in failures)
        first = failures[0][0] if failures else None
        super().__init__(f"{n} tracked events were not delivered; first error: {first}")
        self.failures = failures

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for _, evs in self.failures for e in evs]


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: BadRequestError,
    429: RateLimitedError,
}


def error_for(status: int, body: Any, retry_after: float | None = None, text: str = "") -> ApiError:
    """The ``ApiError`` subclass for an HTTP error answer (Tally's ``{error, message, details}``)."""
    if isinstance(body, dict):
        code = str(body.get("error") or body.get("code") or "error")
        message = str(body.get("message") or text or "no message")
        details = body.get("details")
    else:
        code, message, details = "error", text or f"HTTP {status}", None
    cls = _BY_STATUS.get(status) or (UnavailableError if status >= 500 else ApiError)
    return cls(status, code, message, details, retry_after)
