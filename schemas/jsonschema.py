"""JSON-schema fragments of wire types whose validators accept more than pydantic's defaults
describe (times as RFC 3339 or epoch ms, exact decimals that refuse floats). Models use them
through ``WithJsonSchema`` so that the served OpenAPI document (``api.openapi``) says what the
code really accepts.

The RFC 3339 pattern is the part every generator can produce valid values from: days 01..28 of
any month are always valid dates (29..31 are accepted too, where the month has them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BeforeValidator, Strict

from schemas.timeutil import EPOCH_MS_MAX, EPOCH_MS_MIN

_RFC3339_TAIL = (
    r"-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]"
    r"(:[0-5][0-9](\.[0-9]{1,9})?)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
# years 1000..9998 (a year-9999 time with a negative offset is past year 9999 in UTC)
RFC3339 = r"^([1-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])" + _RFC3339_TAIL
# years 1901..2298: inside what the store keeps (1900..2299 in UTC) whatever the offset
RFC3339_STORE = r"^(190[1-9]|19[1-9][0-9]|2[01][0-9]{2}|22[0-8][0-9]|229[0-8])" + _RFC3339_TAIL

TIME_IN: dict[str, Any] = {
    "description": "RFC 3339 date-time with an offset, or integer epoch milliseconds",
    "anyOf": [
        {"type": "string", "pattern": RFC3339},
        {"type": "integer", "minimum": EPOCH_MS_MIN, "maximum": EPOCH_MS_MAX},
    ],
}

TIME_IN_STORE: dict[str, Any] = {
    "description": "RFC 3339 date-time with an offset, or integer epoch milliseconds, in the "
    "years 1900..2299",
    "anyOf": [
        {"type": "string", "pattern": RFC3339_STORE},
        {"type": "integer", "minimum": -2_208_988_800_000, "maximum": 10_413_791_999_999},
    ],
}
STORE_MIN = datetime(1900, 1, 1, tzinfo=UTC)
STORE_MAX = datetime(2299, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)

# The JSON decoder (orjson) reads integers of 64 bits (signed, or unsigned up to 2**64 - 1)
# exactly; a larger integer literal becomes a floating-point number (its precision is lost):
# where a number must be exact (money, counts) Tally therefore takes integers up to 2**53 and
# wants larger ones as strings.
INT_MIN = -(2**63)
INT_MAX = 2**64 - 1
INT64: dict[str, Any] = {"type": "integer", "minimum": INT_MIN, "maximum": INT_MAX}
EXACT = 2**53  # floats hold integers exactly up to here
# Any JSON value (a free-form object's values).
JSON_VALUE: dict[str, Any] = {
    "description": "any JSON value (integers beyond 64 bits are read as floating-point numbers)",
    "anyOf": [
        {"type": ["null", "boolean", "string", "number"]},
        {"type": "array", "items": {"x-tally-ref": "JsonValue"}},
        {"type": "object", "additionalProperties": {"x-tally-ref": "JsonValue"}},
    ],
}
JSON_OBJECT: dict[str, Any] = {
    "type": "object",
    "additionalProperties": {"x-tally-ref": "JsonValue"},
}


def integral(value: object) -> object:
    """JSON 5.0 is the integer 5 (exact up to 2**53; a larger float may be a rounded integer
    literal, and stays a float: refused where an exact number is needed)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= EXACT:
        return int(value)
    return value


DECIMAL = r"^-?[0-9]{1,20}(\.[0-9]{1,9})?$"
NONNEG_DECIMAL = r"^[0-9]{1,20}(\.[0-9]{1,9})?$"
# at least one non-zero digit: > 0
POSITIVE_DECIMAL = (
    r"^([0-9]{0,19}[1-9][0-9]{0,19}(\.[0-9]{1,9})?|[0-9]{1,20}\.[0-9]{0,8}[1-9][0-9]{0,8})$"
)


def decimal_schema(kind: str = "any", maximum: int | None = None) -> dict[str, Any]:
    """A decimal as a JSON string (up to 20 integer digits, 9 decimals) or integer; never a
    float. ``kind``: ``any``, ``nonneg`` (>= 0) or ``positive`` (> 0)."""
    pattern = {"any": DECIMAL, "nonneg": NONNEG_DECIMAL}.get(kind, POSITIVE_DECIMAL)
    integer: dict[str, Any] = dict(INT64)  # read exactly by the JSON decoder
    if kind == "nonneg":
        integer["minimum"] = 0
    elif kind == "positive":
        integer["minimum"] = 1
    if maximum is not None:
        integer["maximum"] = maximum
    return {
        "description": "a decimal number: a string or an integer, never a float",
        "anyOf": [{"type": "string", "pattern": pattern}, integer],
    }


# An integer as JSON means it: 5 or 5.0, never "5" or true (pydantic's lax mode would take those).
JsonInt = Annotated[int, BeforeValidator(integral), Strict()]


def component(name: str) -> dict[str, Any]:
    """A reference to a shared schema of the OpenAPI document (``api.openapi.COMPONENTS``),
    turned into a ``$ref`` when the document is built."""
    return {"x-tally-ref": name}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


__all__ = [
    "DECIMAL",
    "EXACT",
    "INT64",
    "INT_MAX",
    "INT_MIN",
    "JSON_OBJECT",
    "JSON_VALUE",
    "NONNEG_DECIMAL",
    "POSITIVE_DECIMAL",
    "RFC3339",
    "RFC3339_STORE",
    "STORE_MAX",
    "STORE_MIN",
    "TIME_IN",
    "TIME_IN_STORE",
    "JsonInt",
    "component",
    "decimal_schema",
    "integral",
    "nullable",
]
