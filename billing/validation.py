"""pydantic errors as ``[{field, message}]`` lists naming the field (for ``ValidationError``)."""

from __future__ import annotations

import re
from typing import Any

_NAMED = re.compile(r"^(?:Value error, )?([A-Za-z_][A-Za-z0-9_]*(?:\[\d+\]|\.[A-Za-z0-9_]+)*): ")


def refine_fields(details: list[dict[str, str]], prefix: str = "") -> list[dict[str, str]]:
    """A model-level error (field ``body`` or empty) whose message starts with a field path
    (``charges[0].price.currency: ...``) is attributed to that field (``charges.0.price...``)."""
    out = []
    for d in details:
        field = d.get("field", "")
        if field in ("", "body", prefix):
            m = _NAMED.match(d.get("message", ""))
            if m:
                path = re.sub(r"\[(\d+)\]", r".\1", m.group(1))
                field = f"{prefix}.{path}" if prefix else path
        out.append({**d, "field": field or prefix or "body"})
    return out


def pydantic_details(exc: Any, prefix: str = "") -> list[dict[str, str]]:
    """A pydantic ValidationError as ``[{field, message}]`` (fields joined with dots)."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "body")
        out.append({"field": field, "message": str(err.get("msg", "invalid value"))})
    return refine_fields(out, prefix)
