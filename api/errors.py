"""The one mapping from errors to HTTP responses.

Every error body is ``{"error": code, "message": text, "details"?: ...}``:

- ``tally.errors.TallyError`` -> its ``status`` (``Unavailable`` adds ``Retry-After``);
- FastAPI's ``RequestValidationError`` -> 400, the message names every offending field;
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

from tally.errors import TallyError, Unavailable

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
}


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def error_response(exc: TallyError) -> Response:
    headers: dict[str, str] = {}
    if isinstance(exc, Unavailable):
        headers["Retry-After"] = str(max(1, int(exc.retry_after)))
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return json_response(exc.status, exc.to_dict(), headers)


def _loc_name(loc: tuple[Any, ...]) -> str:
    """('query', 'window') -> 'window'; ('body', 'group_by', 'x') -> 'group_by.x'."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "cookie")]
    return ".".join(parts) if parts else "body"


def validation_details(errors: list[Any]) -> list[dict[str, str]]:
    out = []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "json_invalid":
            out.append({"field": "body", "message": "request body is not valid JSON"})
            continue
        out.append({"field": _loc_name(loc), "message": msg})
    return out


def describe(details: list[dict[str, str]]) -> str:
    return "; ".join(f"{d['field']}: {d['message']}" for d in details) or "invalid request"


async def _tally_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TallyError)
    if exc.status >= 500 and not isinstance(exc, Unavailable):
        log.error("internal error: %s", exc.message, exc_info=exc)
    return error_response(exc)


async def _validation_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    details = validation_details(list(exc.errors()))
    return json_response(
        400, {"error": "invalid_request", "message": describe(details), "details": details}
    )


async def _http_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return json_response(
        exc.status_code, {"error": code, "message": message}, dict(exc.headers or {})
    )


async def _unexpected_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_response(
        500, {"error": "internal_error", "message": "internal server error (logged)"}
    )


def install(app: FastAPI) -> None:
    """Register every handler on ``app``."""
    app.add_exception_handler(TallyError, _tally_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
