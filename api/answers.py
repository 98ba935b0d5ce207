"""JSON schemas of the request bodies and answers that routes build by hand (dicts), for the
OpenAPI document (``api.openapi``). Each mirrors the code that parses or writes it; keep them in
step (``tests/integration/api/test_openapi_schemathesis.py`` checks every answer against them).
"""

from __future__ import annotations

from typing import Any

from schemas.deadletters import REASONS
from schemas.jsonschema import component, nullable
from schemas.meters import SLUG_PATTERN, Aggregation, FilterOp

TEXT = {"type": "string"}
NULL_TEXT = {"type": ["string", "null"]}
INT = {"type": "integer"}
NONNEG_INT = {"type": "integer", "minimum": 0}
BOOL = {"type": "boolean"}
TIME = {"type": "string", "format": "date-time"}
NULL_TIME = {"type": ["string", "null"], "format": "date-time"}
NUMBER = {"type": "number"}


def obj(
    properties: dict[str, Any], required: list[str] | None = None, *, extra: bool = True, **kw: Any
) -> dict[str, Any]:
    """An object schema; ``required`` defaults to every property (answers always carry them)."""
    out: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }
    if not extra:
        out["additionalProperties"] = False
    out.update(kw)
    return out


def data_of(item: dict[str, Any]) -> dict[str, Any]:
    return obj({"data": {"type": "array", "items": item}})


# --- meters -----------------------------------------------------------------------------------

# streams/schemas.jsonpath: $.name, $[0], $["key"] / $['key'] steps (no newline inside quotes)
JSONPATH = (
    r"^\$(\.[A-Za-z_$][A-Za-z0-9_$-]*|\[-?[0-9]{1,18}\]"
    r"|\[\"([^\"\\\n]|\\[^\n])*\"\]|\['([^'\\\n]|\\[^\n])*'\])+$"
)
JSONPATH_SCHEMA = {
    "type": "string",
    "pattern": JSONPATH,
    "description": "a JSONPath into the event's properties: $.a.b, $.a[0], $['key']",
}
_AGG_COUNT = ["count", "COUNT"]
_AGG_VALUE = [a.value for a in Aggregation if a != Aggregation.COUNT]
_AGG_VALUE += [a.upper() for a in _AGG_VALUE]
_OPS_ANY = [FilterOp.EQ.value, FilterOp.NE.value]
_OPS_LIST = [FilterOp.IN.value, FilterOp.NIN.value]
_OPS_NUM = [FilterOp.GT.value, FilterOp.GTE.value, FilterOp.LT.value, FilterOp.LTE.value]
FILTER_NUMBER = {
    "anyOf": [
        {"type": "number", "exclusiveMinimum": -1e29, "exclusiveMaximum": 1e29},
        {"type": "string", "pattern": r"^-?[0-9]{1,28}(\.[0-9]{1,9})?$"},
    ]
}


def _filter(ops: list[str] | None, value: dict[str, Any] | None, value_required: bool) -> Any:
    props: dict[str, Any] = {"property": JSONPATH_SCHEMA}
    props["op"] = {"type": "string", "enum": ops} if ops else {"type": "string", "enum": _OPS_ANY}
    props["value"] = value if value is not None else component("JsonValue")
    required = ["property"] + (["op"] if ops and ops != _OPS_ANY else [])
    if value_required:
        required.append("value")
    return obj(props, required, extra=False)


FILTER = {
    "description": "Keep an event only if the value at `property` satisfies `op value`. "
    "eq/ne (default eq): any JSON value; in/nin: an array; gt/gte/lt/lte: a number or numeric "
    "string; exists: true (default), false or null.",
    "anyOf": [
        _filter(None, None, False),
        _filter(_OPS_LIST, {"type": "array"}, True),
        _filter(_OPS_NUM, FILTER_NUMBER, True),
        _filter(["exists"], {"type": ["boolean", "null"]}, False),
    ],
}


def _meter_in(aggregations: list[str], value_required: bool) -> dict[str, Any]:
    props: dict[str, Any] = {
        "slug": {"type": "string", "pattern": SLUG_PATTERN},
        "name": nullable({"type": "string", "maxLength": 256}),
        "description": nullable({"type": "string", "maxLength": 2048}),
        "event_type": {"type": "string", "minLength": 1, "maxLength": 256},
        "aggregation": {"type": "string", "enum": aggregations},
        "value_property": JSONPATH_SCHEMA if value_required else nullable(JSONPATH_SCHEMA),
        "group_by": {
            "type": "object",
            "maxProperties": 20,
            "propertyNames": {"minLength": 1, "maxLength": 64},
            "additionalProperties": JSONPATH_SCHEMA,
        },
        "filters": {"type": "array", "items": FILTER},
    }
    required = ["slug", "event_type", "aggregation"] + (
        ["value_property"] if value_required else []
    )
    return obj(props, required, extra=False)


METER_IN = {
    "description": "A meter definition. `value_property` is required unless the aggregation is "
    "count. The camelCase names eventType, valueProperty and groupBy are accepted too.",
    "anyOf": [_meter_in(_AGG_COUNT, False), _meter_in(_AGG_VALUE, True)],
}
FILTER_OUT = obj(
    {"property": TEXT, "op": {"type": "string", "enum": [o.value for o in FilterOp]}, "value": {}}
)
METER_OUT = obj(
    {
        "slug": TEXT,
        "name": NULL_TEXT,
        "description": NULL_TEXT,
        "event_type": TEXT,
        "aggregation": {"type": "string", "enum": [a.value for a in Aggregation]},
        "value_property": NULL_TEXT,
        "group_by": {"type": "object", "additionalProperties": TEXT},
        "filters": {"type": "array", "items": FILTER_OUT},
        "id": TEXT,
        "tenant_id": TEXT,
        "created_at": TIME,
        "status": {"type": "string", "enum": ["pending", "active"]},
    }
)
OM_METER = obj(
    {
        "id": TEXT,
        "slug": TEXT,
        "name": TEXT,
        "eventType": TEXT,
        "aggregation": {"type": "string", "enum": [a.value.upper() for a in Aggregation]},
        "groupBy": {"type": "object", "additionalProperties": TEXT},
        "windowSize": {"type": "string", "enum": ["MINUTE"]},
        "createdAt": TIME,
        "updatedAt": TIME,
        "description": TEXT,
        "valueProperty": TEXT,
    },
    [
        "id",
        "slug",
        "name",
        "eventType",
        "aggregation",
        "groupBy",
        "windowSize",
        "createdAt",
        "updatedAt",
    ],
)
BACKFILL_RESULT = obj(
    {
        "meter": TEXT,
        "run_id": TEXT,
        "state": TEXT,
        "resumed": BOOL,
        "events_total": NONNEG_INT,
        "events_scanned": NONNEG_INT,
        "events_matched": NONNEG_INT,
        "value_problems": NONNEG_INT,
        "windows": NONNEG_INT,
        "chunks": NONNEG_INT,
    }
)
BACKFILL_RUN = obj(
    {
        "run_id": TEXT,
        "state": {"type": "string", "enum": ["running", "complete", "failed", "interrupted"]},
        "visible": BOOL,
        "events_total": NONNEG_INT,
        "events_scanned": NONNEG_INT,
        "events_matched": NONNEG_INT,
        "value_problems": NONNEG_INT,
        "windows": NONNEG_INT,
        "chunks": NONNEG_INT,
        "error": NULL_TEXT,
        "started_at": NULL_TIME,
        "heartbeat_at": NULL_TIME,
        "finished_at": NULL_TIME,
    }
)
BACKFILL_RUNS = obj(
    {"meter": TEXT, "visible_run": NULL_TEXT, "data": {"type": "array", "items": BACKFILL_RUN}}
)

# --- usage ------------------------------------------------------------------------------------

WINDOWS = ["MINUTE", "HOUR", "DAY", "MONTH"]
USAGE_ROW = obj(
    {
        "window_start": TIME,
        "window_end": TIME,
        "customer": TEXT,
        "group_by": {"type": "object", "additionalProperties": TEXT},
        "value": {"type": ["string", "null"], "description": "a decimal number as a string"},
    },
    ["window_start", "window_end", "group_by", "value"],
)
USAGE = obj(
    {
        "meter": TEXT,
        "aggregation": {"type": "string", "enum": [a.value for a in Aggregation]},
        "from": TIME,
        "to": TIME,
        "window": {"type": ["string", "null"], "enum": [*WINDOWS, None]},
        "tz": TEXT,
        "data": {"type": "array", "items": USAGE_ROW},
    }
)
OM_USAGE_ROW = obj(
    {
        "value": NUMBER,
        "windowStart": TIME,
        "windowEnd": TIME,
        "subject": NULL_TEXT,
        "groupBy": {"type": "object", "additionalProperties": TEXT},
    }
)
OM_USAGE = obj(
    {
        "from": TIME,
        "to": TIME,
        "windowSize": {"type": "string", "enum": WINDOWS},
        "data": {"type": "array", "items": OM_USAGE_ROW},
    },
    ["from", "to", "data"],
)
CSV_TEXT = {"type": "string", "description": "CSV with a header row"}

# --- tenants, keys, admin tokens, limits ------------------------------------------------------

TENANT = obj({"tenant_id": TEXT, "name": TEXT, "created_at": TIME})
TENANT_IN = obj(
    {"name": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": r"\S"}},
    ["name"],
    description="Unknown fields are ignored.",
)
TENANT_CREATED = obj(
    {**TENANT["properties"], "api_key": {"type": "string", "description": "shown once"}}
)
API_KEY = obj(
    {
        "id": TEXT,
        "tenant_id": TEXT,
        "name": TEXT,
        "prefix": TEXT,
        "status": {"type": "string", "enum": ["active", "expired", "revoked"]},
        "created_at": TIME,
        "expires_at": NULL_TIME,
        "revoked_at": NULL_TIME,
        "last_used_at": NULL_TIME,
    }
)
API_KEY_CREATED = obj(
    {
        **API_KEY["properties"],
        "api_key": {"type": "string", "description": "the secret, shown once"},
    }
)
API_KEY_ROTATED = obj({**API_KEY_CREATED["properties"], "previous": API_KEY})
ADMIN_TOKEN = obj(
    {
        "id": TEXT,
        "name": TEXT,
        "status": {"type": "string", "enum": ["active", "revoked"]},
        "created_at": TIME,
        "revoked_at": NULL_TIME,
    }
)
ADMIN_TOKEN_CREATED = obj(
    {**ADMIN_TOKEN["properties"], "admin_token": {"type": "string", "description": "shown once"}}
)
_LIMIT_VALUES: dict[str, dict[str, Any]] = {
    "requests_per_second": NUMBER,
    "events_per_second": NUMBER,
    "max_batch_events": NONNEG_INT,
    "monthly_events": NONNEG_INT,
}
LIMITS = obj(
    {
        "tenant_id": TEXT,
        "overrides": obj({k: {"type": [v["type"], "null"]} for k, v in _LIMIT_VALUES.items()}),
        "effective": obj(dict(_LIMIT_VALUES)),
        "api_replicas": {"type": "integer", "minimum": 1},
    }
)

# --- health -----------------------------------------------------------------------------------

HEALTH = obj({"status": {"type": "string", "enum": ["ok"]}})
_CHECKS = {"type": "object", "additionalProperties": TEXT}
READY = obj(
    {
        "status": {"type": "string", "enum": ["ready"]},
        "checks": _CHECKS,
        "components": {"type": "object"},
    }
)
NOT_READY = {
    "allOf": [
        {"$ref": "#/components/schemas/Error"},
        obj(
            {
                "status": {"type": "string", "enum": ["not_ready"]},
                "checks": _CHECKS,
                "components": {"type": "object"},
            }
        ),
    ]
}

# --- dead letters -----------------------------------------------------------------------------

DEAD_LETTER = obj(
    {
        "id": TEXT,
        "tenant_id": NULL_TEXT,
        "reason": {"type": "string", "enum": list(REASONS)},
        "message": TEXT,
        "source": obj(
            {
                "topic": TEXT,
                "partition": NONNEG_INT,
                "offset": NONNEG_INT,
                "index": {"type": ["integer", "null"], "minimum": 0},
            }
        ),
        "event_id": NULL_TEXT,
        "meter_id": NULL_TEXT,
        "produced_at": NULL_TIME,
        "payload_bytes": NONNEG_INT,
        "payload_truncated": BOOL,
        "redrivable": BOOL,
        "redrives": NONNEG_INT,
        "last_redriven_at": NULL_TIME,
        "payload_excerpt": {
            "type": "string",
            "description": "the first 200 bytes of the payload as text (bad UTF-8 replaced, "
            "'...' when longer)",
        },
    }
)
DEAD_LETTER_FULL = obj(
    {
        **DEAD_LETTER["properties"],
        "payload": {
            "type": ["string", "null"],
            "description": "the payload as UTF-8 text (null when it is not UTF-8)",
        },
        "payload_base64": {"type": "string", "description": "the payload's bytes, base64"},
    }
)
REDRIVE_RESULT = obj(
    {
        "id": TEXT,
        "topic": TEXT,
        "messages": NONNEG_INT,
        "events": NONNEG_INT,
        "positions": {
            "type": "array",
            "items": obj({"partition": NONNEG_INT, "offset": NONNEG_INT}),
        },
        "redriven_at": TIME,
    }
)
BULK_REDRIVE_IN = obj(
    {
        "tenant_id": nullable({"type": "string", "minLength": 1, "maxLength": 64}),
        "reason": nullable({"type": "string", "enum": list(REASONS)}),
        "topic": nullable({"type": "string", "minLength": 1, "maxLength": 256}),
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
        "include_redriven": BOOL,
    },
    [],
    extra=False,
)
BULK_REDRIVE = obj(
    {
        "redriven": {"type": "array", "items": REDRIVE_RESULT},
        "refused": {"type": "array", "items": obj({"id": TEXT, "message": TEXT})},
    }
)
