"""Usage queries: native ``GET /v1/meters/{slug}/usage`` and OpenMeter
``GET|POST /api/v1/meters/{slug}/query``. Served from the minute pre-aggregates
(``clickhouse.usage.usage_values``). Parameters and defaults: see ``api.usage_params``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from api import answers as A
from api.auth import Tenant
from api.billing_state import billing
from api.bodies import read_body
from api.errors import json_response
from api.ingest_parse import load_optional_json
from api.openapi import doc, query
from api.state import AppState, State
from api.usage_params import (
    MAX_QUERY_VALUES,
    MAX_VALUES,
    UsageParams,
    iso,
    native_csv,
    native_params,
    native_rows,
    openmeter_body_fields,
    openmeter_csv,
    openmeter_params,
    openmeter_query_fields,
    openmeter_rows,
    wants_csv,
)
from clickhouse.usage import usage_values
from schemas.catalog import TimeZone
from schemas.jsonschema import RFC3339
from schemas.timeutil import utc_now
from schemas.usage import UsageMeter, UsageQuery, WindowSize
from tally.errors import NotFound

router = APIRouter()

CSV = "text/csv; charset=utf-8"

# --- OpenAPI -----------------------------------------------------------------------------------

_MINUTE_TIME = RFC3339.replace(r"(:[0-5][0-9](\.[0-9]{1,9})?)?", r"(:00(\.0{1,9})?)?")
_INSTANT = {
    "anyOf": [
        {"type": "string", "pattern": RFC3339},
        {"type": "string", "pattern": r"^-?[0-9]{1,15}$"},
        {"type": "string", "maxLength": 0, "description": "empty: the default"},
    ]
}
_ZONE = TimeZone.__metadata__[-1].json_schema  # type: ignore[attr-defined]
_STRINGS = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 256},
    "maxItems": MAX_QUERY_VALUES,
}
_BODY_STRINGS = {**_STRINGS, "maxItems": MAX_VALUES}
_VALUE = {"type": "string", "minLength": 1, "maxLength": 256}
_WINDOW = {"type": "string", "enum": A.WINDOWS + [w.lower() for w in A.WINDOWS]}
USAGE_PARAMS = [
    query(
        "from",
        {
            "anyOf": [
                {"type": "string", "pattern": _MINUTE_TIME},
                {"type": "string", "pattern": r"^-?[0-9]{1,15}$"},
            ]
        },
        "Start (inclusive): RFC 3339 with offset or epoch ms, a whole minute; default: the start "
        "of today in `tz`. Must be before `to`.",
    ),
    query(
        "to",
        {
            "anyOf": [
                {"type": "string", "pattern": _MINUTE_TIME},
                {"type": "string", "pattern": r"^-?[0-9]{1,15}$"},
            ]
        },
        "End (exclusive), a whole minute; default: the end of the current minute",
    ),
    query(
        "window",
        _WINDOW,
        "Window size; absent: one total for the whole range (at most 100000 windows)",
    ),
    query("tz", _ZONE, "IANA time zone of the windows (default UTC)"),
    query("customer", _STRINGS, "Only these customers (rows per customer)", explode=True),
    query(
        "group_by",
        _STRINGS,
        "Group by these group_by dimensions of the meter; `customer`: rows per customer",
        explode=True,
    ),
    query(
        "filter",
        {"type": "object", "additionalProperties": _VALUE, "maxProperties": 20},
        "filter[<dimension>]=<value>: only rows whose dimension (of the meter's group_by) has "
        "one of the values",
        style="deepObject",
        explode=True,
    ),
    query(
        "format",
        {"type": "string", "enum": ["json", "csv"]},
        "csv: the rows as CSV (also Accept: text/csv)",
    ),
]
OM_PARAMS = [
    query("from", _INSTANT, "Start: RFC 3339 with offset or epoch ms (floored to the minute)"),
    query("to", _INSTANT, "End (exclusive; ceiled to the minute)"),
    query("windowSize", _WINDOW, "MINUTE, HOUR, DAY or MONTH; absent: one total"),
    query("windowTimeZone", _ZONE, "IANA time zone of the windows (default UTC)"),
    query("subject", _STRINGS, "Only these customers (rows per subject)", explode=True),
    query("filterCustomerId", _STRINGS, "Only these customers", explode=True),
    query(
        "groupBy",
        _STRINGS,
        "Group by these dimensions of the meter; `subject`: rows per customer",
        explode=True,
    ),
    query(
        "filterGroupBy",
        {"type": "object", "additionalProperties": _VALUE, "maxProperties": 20},
        "filterGroupBy[<dimension>]=<value>",
        style="deepObject",
        explode=True,
    ),
    query("clientId", {"type": "string"}, "Accepted and ignored"),
]
OM_BODY = A.obj(
    {
        "from": {"anyOf": [*_INSTANT["anyOf"], {"type": "null"}]},
        "to": {"anyOf": [*_INSTANT["anyOf"], {"type": "null"}]},
        "windowSize": {"anyOf": [_WINDOW, {"type": "null"}]},
        "windowTimeZone": {"anyOf": [_ZONE, {"type": "null"}]},
        "clientId": {"type": ["string", "null"]},
        "subject": {"anyOf": [_BODY_STRINGS, {"type": "null"}]},
        "groupBy": {"anyOf": [_BODY_STRINGS, {"type": "null"}]},
        "filterCustomerId": {"anyOf": [_BODY_STRINGS, {"type": "null"}]},
        "filterGroupBy": {
            "anyOf": [
                {
                    "type": "object",
                    "additionalProperties": {"anyOf": [_VALUE, _BODY_STRINGS]},
                },
                {"type": "null"},
            ]
        },
    },
    [],
    description="The query of GET as a JSON object (an empty body = no parameters). "
    "`from`/`to`: RFC 3339 with offset or epoch ms.",
)
_USAGE_OK = {
    "description": "Usage per window (JSON, or CSV with format=csv / Accept: text/csv)",
    "content": {"application/json": {"schema": A.USAGE}, "text/csv": {"schema": A.CSV_TEXT}},
}
_OM_OK = {
    "description": "OpenMeter's query answer (JSON, or CSV with Accept: text/csv)",
    "content": {"application/json": {"schema": A.OM_USAGE}, "text/csv": {"schema": A.CSV_TEXT}},
}


async def _meter(st: AppState, tenant_id: str, slug: str) -> UsageMeter:
    try:
        found: UsageMeter = await st.meters.get(tenant_id, slug)
    except NotFound:
        raise NotFound(
            f"meter {slug!r} not found", details=[{"field": "slug", "message": "unknown meter"}]
        ) from None
    return found


async def _run(
    request: Request,
    st: AppState,
    tenant_id: str,
    um: UsageMeter,
    p: UsageParams,
    api: str = "native",
) -> list[Any]:
    q = UsageQuery.model_validate(
        {
            "tenant_id": tenant_id,
            "meter": um.meter,
            "from": p.from_,
            "to": p.to,
            "window": WindowSize[p.window] if p.window else None,
            "tz": p.tz,
            "customers": list(p.customers),
            "group_by": list(p.group_by),
            "filters": {k: list(v) for k, v in p.filters.items()},
            "by_customer": p.by_customer,
        }
    )
    # corrected min/max/unique_count/latest windows are recomputed first when out of date
    repair = billing(request, st).corrections.repair
    started = time.perf_counter()
    # a meter read without backfill runs and corrections (its cache entry) skips the statement
    # asking for them
    rows: list[Any] = await st.run(
        functools.partial(usage_values, stream_only=um.stream_only), st.store, q, repair
    )
    st.metrics.usage_query.labels(api).observe(time.perf_counter() - started)
    return rows


@router.get(
    "/v1/meters/{slug}/usage", tags=["usage"], **doc(ok={200: _USAGE_OK}, params=USAGE_PARAMS)
)
async def usage(
    slug: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    um = await _meter(st, tenant_id, slug)
    meter = um.meter
    query = request.query_params.multi_items()
    p = native_params(query, meter.group_by, utc_now())
    csv = wants_csv(request.headers.get("accept"), request.query_params.get("format"))
    rows = native_rows(await _run(request, st, tenant_id, um, p), p.by_customer)
    if csv:
        return Response(native_csv(rows, p.group_by, p.by_customer), media_type=CSV)
    return json_response(
        200,
        {
            "meter": meter.slug,
            "aggregation": meter.aggregation.value,
            "from": iso(p.from_),
            "to": iso(p.to),
            "window": p.window,
            "tz": p.tz,
            "data": rows,
        },
    )


async def _om_query(
    request: Request,
    st: AppState,
    tenant_id: str,
    slug: str,
    fields: dict[str, Any],
    max_values: int = MAX_VALUES,
) -> Response:
    accept = request.headers.get("accept")
    um = await _meter(st, tenant_id, slug)
    p = openmeter_params(fields, um.meter.group_by, utc_now(), max_values)
    result = await _run(request, st, tenant_id, um, p, "openmeter")
    if wants_csv(accept, None):
        rows = openmeter_rows(result, p.by_customer, exact=True)
        return Response(openmeter_csv(rows, p.group_by, p.by_customer), media_type=CSV)
    rows = openmeter_rows(result, p.by_customer)
    body: dict[str, Any] = {"from": iso(p.from_), "to": iso(p.to), "data": rows}
    if p.window:
        body["windowSize"] = p.window
    return json_response(200, body)


@router.get(
    "/api/v1/meters/{slug}/query", tags=["openmeter"], **doc(ok={200: _OM_OK}, params=OM_PARAMS)
)
async def om_query_get(
    slug: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    fields = openmeter_query_fields(request.query_params.multi_items())
    return await _om_query(request, st, tenant_id, slug, fields, MAX_QUERY_VALUES)


@router.post(
    "/api/v1/meters/{slug}/query",
    tags=["openmeter"],
    **doc(ok={200: _OM_OK}, body=OM_BODY, body_required=False),
)
async def om_query_post(
    slug: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    raw = await read_body(request, 64 * 1024)
    fields = openmeter_body_fields(load_optional_json(raw, {}))
    return await _om_query(request, st, tenant_id, slug, fields)
