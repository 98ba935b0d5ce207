"""Reading request bodies: the size limit, and JSON object bodies parsed into a model.

One place decides what a body is: zero bytes is "no body" where a body is optional (the model's
defaults apply); anything else must be JSON, so a body of only whitespace is refused naming
``body`` like any other malformed JSON. Where a body is required, an empty one (or only
whitespace) is refused as empty.
"""

from __future__ import annotations

from typing import TypeVar

import pydantic
from fastapi import Request

from api.ingest_parse import load_json, load_optional_json
from tally.errors import PayloadTooLarge, ValidationError

M = TypeVar("M", bound=pydantic.BaseModel)

SMALL_BODY = 16 * 1024  # keys, limits, tokens, re-drive requests: a few fields each


async def read_body(request: Request, limit: int, setting: str | None = None) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) before and while reading;
    ``setting`` names the setting the limit comes from, if one does."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ValidationError(
                "invalid Content-Length header",
                details=[{"field": "content-length", "message": "not an integer"}],
            ) from None
        if n > limit:
            raise _too_large(limit, n, setting)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, size, setting, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(
    limit: int, size: int, setting: str | None, at_least: bool = False
) -> PayloadTooLarge:
    what = f"at least {size}" if at_least else str(size)
    source = f" ({setting})" if setting else ""
    return PayloadTooLarge(
        f"request body is {what} bytes; the limit is {limit} bytes{source}",
        details=[{"field": "body", "message": f"at most {limit} bytes"}],
    )


def object_body(raw: bytes, model: type[M], what: str, *, optional: bool = False) -> M:
    """``raw`` as a JSON object validated by ``model``; 400 naming every bad field.

    ``what`` names the object in messages ("meter", "key"). ``optional``: zero bytes means all
    of the model's defaults."""
    doc = load_optional_json(raw, {}) if optional else load_json(raw, f"a JSON {what}")
    if not isinstance(doc, dict):
        raise ValidationError(
            f"a {what} must be a JSON object",
            details=[{"field": "body", "message": "expected a JSON object"}],
        )
    try:
        return model.model_validate(doc)
    except pydantic.ValidationError as exc:
        raise ValidationError.from_pydantic(exc, f"invalid {what}") from None


async def parse_body(
    request: Request, model: type[M], what: str, *, limit: int, optional: bool = False
) -> M:
    """The request's body (at most ``limit`` bytes) through :func:`object_body`."""
    return object_body(await read_body(request, limit), model, what, optional=optional)
