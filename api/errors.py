"""The one mapping from errors to HTTP responses.

Every error body is ``{"error": code, "message": text, "details": [{"field", "message"}]}``
(``details`` always a list, possibly empty), built by ``error_body`` from ``tally.errors``:

- ``tally.errors.TallyError`` -> its ``status`` (``Retryable``: 429/503 add ``Retry-After``);
- FastAPI's ``RequestValidationError`` -> 400 through ``tally.errors.pydantic_details``;
- a body that is not JSON -> 400 (raised as ``ValidationError`` by the parsers);
- Starlette's ``HTTPException`` (unknown route, wrong method) -> its status, same body shape;
- anything else -> 500 with a generic message; the exception is logged with its traceback.
  Input must never reach this branch: a 500 is a bug.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from tally.errors import (
    AuthenticationError,
    Retryable,
    TallyError,
    ValidationError,
    normalize_details,
    summarize,
)

log = logging.getLogger(__name__)


_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """THE error body: ``{error, message, details: [{field, message}]}``."""
    return {"error": code, "message": message, "details": normalize_details(details, message)}


def error_response(exc: TallyError) -> Response:
    headers: dict[str, str] = {}
    if isinstance(exc, Retryable):
        headers["Retry-After"] = str(max(1, int(exc.retry_after)))
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return json_response(exc.status, error_body(exc.code, exc.message, exc.details), headers)


async def _tally_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TallyError)
    if exc.status >= 500 and not isinstance(exc, Retryable):
        log.error("internal error: %s", exc.message, exc_info=exc)
    return error_response(exc)


async def _validation_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    err = ValidationError.from_pydantic(exc, "invalid request")
    err.message = summarize(err.details)
    return error_response(err)


def _allowed_methods(request: Request) -> str | None:
    """Every method of every route of the request's path (Starlette's own ``Allow`` names only
    the first route that matched the path, and FastAPI has one route per method)."""
    from api.openapi import api_routes  # late: api.openapi imports the routers' modules

    app = request.app
    table = getattr(app.state, "allowed_methods", None)
    if table is None:
        table = {}
        for template, method, route in api_routes(app):
            table.setdefault(template, (route.path_regex, set()))[1].add(method)
        app.state.allowed_methods = table
    path = request.url.path
    methods: set[str] = set()
    if path in table:  # a fixed path (/v1/invoices/run) wins over a template ({invoice_id})
        methods |= table[path][1]
    else:
        for regex, found in table.values():
            if regex.match(path):
                methods |= found
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods)) if methods else None


async def _http_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allow = _allowed_methods(request)
        if allow:
            headers["Allow"] = allow
    return json_response(exc.status_code, error_body(code, message), headers)


async def _unexpected_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_response(500, error_body("internal_error", "internal server error (logged)"))


def install(app: FastAPI) -> None:
    """Register every handler on ``app``."""
    app.add_exception_handler(TallyError, _tally_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
