"""Usage queries: native ``GET /v1/meters/{slug}/usage`` and OpenMeter
``GET|POST /api/v1/meters/{slug}/query``. Served from the minute pre-aggregates
(``clickhouse.usage.run_usage``). Parameters and defaults: see ``api.usage_params``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from api.auth import current_tenant
from api.billing_state import billing
from api.errors import json_response
from api.ingest import read_body
from api.ingest_parse import load_json
from api.state import AppState, get_state
from api.usage_params import (
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
from clickhouse.usage import run_usage
from schemas.meters import Meter
from schemas.timeutil import utc_now
from schemas.usage import UsageQuery, WindowSize
from tally.errors import NotFound

router = APIRouter()

CSV = "text/csv; charset=utf-8"


async def _meter(st: AppState, tenant_id: str, slug: str) -> Meter:
    try:
        meter: Meter = await st.run(st.repo.get_meter, tenant_id, slug)
    except NotFound:
        raise NotFound(
            f"meter {slug!r} not found", details=[{"field": "slug", "message": "unknown meter"}]
        ) from None
    return meter


async def _run(
    request: Request,
    st: AppState,
    tenant_id: str,
    meter: Meter,
    p: UsageParams,
    api: str = "native",
) -> list[Any]:
    q = UsageQuery.model_validate(
        {
            "tenant_id": tenant_id,
            "meter": meter,
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
    rows: list[Any] = await st.run(run_usage, st.store, q, repair)
    st.metrics.usage_query.labels(api).observe(time.perf_counter() - started)
    return rows


@router.get("/v1/meters/{slug}/usage", tags=["usage"])
async def usage(
    slug: str,
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    meter = await _meter(st, tenant_id, slug)
    query = request.query_params.multi_items()
    p = native_params(query, meter.group_by, utc_now())
    csv = wants_csv(request.headers.get("accept"), request.query_params.get("format"))
    rows = native_rows(await _run(request, st, tenant_id, meter, p), p.by_customer)
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
    request: Request, st: AppState, tenant_id: str, slug: str, fields: dict[str, Any]
) -> Response:
    accept = request.headers.get("accept")
    meter = await _meter(st, tenant_id, slug)
    p = openmeter_params(fields, meter.group_by, utc_now())
    result = await _run(request, st, tenant_id, meter, p, "openmeter")
    if wants_csv(accept, None):
        rows = openmeter_rows(result, p.by_customer, exact=True)
        return Response(openmeter_csv(rows, p.group_by, p.by_customer), media_type=CSV)
    rows = openmeter_rows(result, p.by_customer)
    body: dict[str, Any] = {"from": iso(p.from_), "to": iso(p.to), "data": rows}
    if p.window:
        body["windowSize"] = p.window
    return json_response(200, body)


@router.get("/api/v1/meters/{slug}/query", tags=["openmeter"])
async def om_query_get(
    slug: str,
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    fields = openmeter_query_fields(request.query_params.multi_items())
    return await _om_query(request, st, tenant_id, slug, fields)


@router.post("/api/v1/meters/{slug}/query", tags=["openmeter"])
async def om_query_post(
    slug: str,
    request: Request,
    tenant_id: str = Depends(current_tenant),
    st: AppState = Depends(get_state),
) -> Response:
    raw = await read_body(request, 64 * 1024)
    fields = openmeter_body_fields(load_json(raw)) if raw.strip() else {}
    return await _om_query(request, st, tenant_id, slug, fields)
