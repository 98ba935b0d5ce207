"""Invoicing endpoints: invoice runs, invoices (JSON, CSV, PDF) and their lifecycle, credit
notes, discounts, event corrections, the audit trail and reconciliation. The use-cases live in
``billing`` (``api.billing_state``); this module parses, authenticates and answers.
See docs/invoicing.md.
"""

from __future__ import annotations

from typing import Any

import orjson
import pydantic
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from api.auth import Tenant, require_admin
from api.billing_state import actor_of, billing
from api.bodies import parse_body, read_body
from api.catalog import _body, _ok
from api.errors import json_response
from api.openapi import doc, link, model, model_list, query
from api.state import State
from billing import reconcile, render
from schemas.billing import (
    AuditRecord,
    Correction,
    CorrectionIn,
    CreditNote,
    CreditNoteIn,
    Discount,
    DiscountIn,
    ExternalLine,
    Invoice,
    InvoiceStatus,
    ReconciliationIn,
    ReconciliationReport,
    RunIn,
    RunOut,
    VoidIn,
)
from schemas.catalog import _time
from tally.errors import ValidationError, summarize

router = APIRouter()
admin_router = APIRouter(dependencies=[Depends(require_admin)])

CSV = "text/csv; charset=utf-8"
MAX_RECON_BODY = 32 * 1024 * 1024

# --- OpenAPI -----------------------------------------------------------------------------------

_CSV_TEXT = {"type": "string", "description": "CSV with a header row"}
_PDF = {"type": "string", "format": "binary"}
_FORMAT = query(
    "format", {"type": "string", "enum": ["json", "csv"]}, "csv: the document as CSV (also Accept)"
)


def _json_or_csv(schema: Any) -> dict[str, Any]:
    return {
        "description": "JSON, or CSV with format=csv / Accept: text/csv",
        "content": {"application/json": {"schema": schema}, "text/csv": {"schema": _CSV_TEXT}},
    }


_CSV_ONLY = {"description": "CSV", "content": {"text/csv": {"schema": _CSV_TEXT}}}
_PDF_ONLY = {"description": "PDF", "content": {"application/pdf": {"schema": _PDF}}}
_CUSTOMER_FILTER = query("customer_id", {"type": "string"}, "only this customer's documents")
_RECON_QUERY = [
    query("period_start", {"type": "string"}, "with a CSV body: the period start (RFC 3339)"),
    query("period_end", {"type": "string"}, "with a CSV body: the period end (RFC 3339)"),
    query("amount_tolerance", {"type": "string"}, "with a CSV body: the amount tolerance"),
    _FORMAT,
]


def _wants_csv(request: Request) -> bool:
    fmt = request.query_params.get("format")
    if fmt is not None:
        if fmt not in ("json", "csv"):
            raise ValidationError(
                "format must be json or csv", details=[{"field": "format", "message": "json|csv"}]
            )
        return fmt == "csv"
    return "text/csv" in request.headers.get("accept", "")


# --- runs -------------------------------------------------------------------------------------


@router.post(
    "/v1/invoices/run",
    tags=["invoices"],
    **doc(ok={200: model(RunOut)}, body=model(RunIn, "validation"), body_required=False),
)
async def run_invoices(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    req = await parse_body(request, RunIn, "invoice run", limit=64 * 1024, optional=True)
    svc = billing(request, st).invoicing
    out = await st.run(svc.run, tenant_id, req.as_of, actor_of(request))
    return _ok(out)


@admin_router.post(
    "/v1/admin/tenants/{tenant_id}/invoices/run",
    tags=["admin"],
    **doc(ok={200: model(RunOut)}, body=model(RunIn, "validation"), body_required=False),
)
async def admin_run_invoices(tenant_id: str, request: Request, st: State) -> Response:
    req = await parse_body(request, RunIn, "invoice run", limit=64 * 1024, optional=True)
    await st.run(st.repo.get_tenant, tenant_id)
    svc = billing(request, st).invoicing
    return _ok(await st.run(svc.run, tenant_id, req.as_of, "admin"))


# --- invoices ---------------------------------------------------------------------------------


@router.get(
    "/v1/invoices",
    tags=["invoices"],
    **doc(
        ok={200: model_list(Invoice)},
        params=[
            query(
                "status",
                {"type": "string", "enum": ["", *[s.value for s in InvoiceStatus]]},
                "only invoices in this status (empty: all)",
            ),
            _CUSTOMER_FILTER,
        ],
    ),
)
async def list_invoices(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    raw = request.query_params.get("status")
    status = None
    if raw:
        try:
            status = InvoiceStatus(raw)
        except ValueError:
            raise ValidationError(
                "status must be draft, finalized or void",
                details=[{"field": "status", "message": f"unknown status {raw!r}"}],
            ) from None
    customer = request.query_params.get("customer_id") or None
    svc = billing(request, st).invoicing
    return _ok(await st.run(svc.list_invoices, tenant_id, customer, status))


@router.get(
    "/v1/invoices/{invoice_id}",
    tags=["invoices"],
    **doc(ok={200: _json_or_csv(model(Invoice))}, params=[_FORMAT]),
)
async def get_invoice(
    invoice_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    inv = await st.run(billing(request, st).invoicing.get_invoice, tenant_id, invoice_id)
    if _wants_csv(request):
        return Response(render.to_csv(inv), media_type=CSV)
    return _ok(inv)


@router.get(
    "/v1/invoices/{invoice_id}/csv",
    tags=["invoices"],
    **doc(ok={200: _CSV_ONLY}),
)
async def invoice_csv(
    invoice_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    inv = await st.run(billing(request, st).invoicing.get_invoice, tenant_id, invoice_id)
    return Response(render.to_csv(inv), media_type=CSV)


@router.get(
    "/v1/invoices/{invoice_id}/pdf",
    tags=["invoices"],
    **doc(ok={200: _PDF_ONLY}),
)
async def invoice_pdf(
    invoice_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    inv = await st.run(billing(request, st).invoicing.get_invoice, tenant_id, invoice_id)
    name = inv.number or inv.id
    return Response(
        render.to_pdf(inv),
        media_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="{name}.pdf"'},
    )


@router.post(
    "/v1/invoices/{invoice_id}/finalize",
    tags=["invoices"],
    **doc(ok={200: model(Invoice)}, errors=(409,)),
)
async def finalize_invoice(
    invoice_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).invoicing
    return _ok(await st.run(svc.finalize, tenant_id, invoice_id, actor_of(request)))


@router.post(
    "/v1/invoices/{invoice_id}/refresh",
    tags=["invoices"],
    **doc(ok={200: model(Invoice)}, errors=(409,)),
)
async def refresh_invoice(
    invoice_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).invoicing
    return _ok(await st.run(svc.refresh, tenant_id, invoice_id, actor_of(request)))


@router.post(
    "/v1/invoices/{invoice_id}/void",
    tags=["invoices"],
    **doc(ok={200: model(Invoice)}, body=model(VoidIn, "validation"), errors=(409,)),
)
async def void_invoice(
    invoice_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    req = await _body(request, VoidIn, "void request")
    svc = billing(request, st).invoicing
    return _ok(await st.run(svc.void, tenant_id, invoice_id, req, actor_of(request)))


# --- credit notes -----------------------------------------------------------------------------


@router.post(
    "/v1/invoices/{invoice_id}/credit-notes",
    status_code=201,
    tags=["invoices"],
    **doc(ok={201: model(CreditNote)}, body=model(CreditNoteIn, "validation"), errors=(409,)),
)
async def create_credit_note(
    invoice_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    req = await _body(request, CreditNoteIn, "credit note")
    svc = billing(request, st).invoicing
    note = await st.run(svc.create_credit_note, tenant_id, invoice_id, req, actor_of(request))
    return _ok(note, 201)


@router.get(
    "/v1/invoices/{invoice_id}/credit-notes",
    tags=["invoices"],
    **doc(ok={200: model_list(CreditNote)}),
)
async def invoice_credit_notes(
    invoice_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).invoicing
    await st.run(svc.get_invoice, tenant_id, invoice_id)
    return _ok(await st.run(svc.list_credit_notes, tenant_id, invoice_id))


@router.get(
    "/v1/credit-notes",
    tags=["invoices"],
    **doc(ok={200: model_list(CreditNote)}, params=[_CUSTOMER_FILTER]),
)
async def list_credit_notes(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).invoicing
    customer = request.query_params.get("customer_id") or None
    return _ok(await st.run(svc.list_credit_notes, tenant_id, None, customer))


@router.get(
    "/v1/credit-notes/{note_id}",
    tags=["invoices"],
    **doc(ok={200: _json_or_csv(model(CreditNote))}, params=[_FORMAT]),
)
async def get_credit_note(
    note_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    note = await st.run(billing(request, st).invoicing.get_credit_note, tenant_id, note_id)
    if _wants_csv(request):
        return Response(render.to_csv(note), media_type=CSV)
    return _ok(note)


@router.get(
    "/v1/credit-notes/{note_id}/pdf",
    tags=["invoices"],
    **doc(ok={200: _PDF_ONLY}),
)
async def credit_note_pdf(
    note_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    note = await st.run(billing(request, st).invoicing.get_credit_note, tenant_id, note_id)
    return Response(
        render.to_pdf(note),
        media_type="application/pdf",
        headers={"Content-Disposition": f'inline; filename="{note.number}.pdf"'},
    )


# --- discounts --------------------------------------------------------------------------------


@router.post(
    "/v1/customers/{customer_id}/discounts",
    status_code=201,
    tags=["invoices"],
    **doc(ok={201: model(Discount)}, body=model(DiscountIn, "validation")),
)
async def add_discount(
    customer_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    req = await _body(request, DiscountIn, "discount")
    svc = billing(request, st).invoicing
    return _ok(await st.run(svc.add_discount, tenant_id, customer_id, req, actor_of(request)), 201)


@router.get(
    "/v1/customers/{customer_id}/discounts",
    tags=["invoices"],
    **doc(ok={200: model_list(Discount)}),
)
async def list_discounts(
    customer_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).invoicing
    return _ok(await st.run(svc.list_discounts, tenant_id, customer_id))


@router.delete(
    "/v1/customers/{customer_id}/discounts/{discount_id}",
    tags=["invoices"],
    **doc(ok={200: model(Discount)}),
)
async def delete_discount(
    customer_id: str,
    discount_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).invoicing
    return _ok(
        await st.run(svc.delete_discount, tenant_id, customer_id, discount_id, actor_of(request))
    )


# --- corrections and audit --------------------------------------------------------------------


@router.post(
    "/v1/events/{event_id}/corrections",
    status_code=201,
    tags=["invoices"],
    **doc(ok={201: model(Correction)}, body=model(CorrectionIn, "validation"), errors=(409,)),
)
async def correct_event(
    event_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    req = await _body(request, CorrectionIn, "correction")
    svc = billing(request, st).corrections
    try:
        done = await st.run(svc.correct, tenant_id, event_id, req, actor_of(request))
    finally:
        # usage queries of this process include it from now on (even one that failed after
        # writing: the store decides what counts)
        st.meters.forget_tenant(tenant_id)
    return _ok(done, 201)


@router.get(
    "/v1/events/{event_id}/corrections",
    tags=["invoices"],
    **doc(ok={200: model_list(Correction)}),
)
async def event_corrections(
    event_id: str,
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    svc = billing(request, st).corrections
    return _ok(await st.run(svc.history, tenant_id, event_id))


@router.get(
    "/v1/audit",
    tags=["invoices"],
    **doc(
        ok={200: model_list(AuditRecord)},
        params=[
            query(
                "object_type",
                {"type": "string"},
                "only this kind of object (invoice, subscription, ...)",
            ),
            query("object_id", {"type": "string"}, "only this object"),
        ],
    ),
)
async def audit(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    q = request.query_params
    rows = billing(request, st).rows
    found = await st.run(
        rows.audit, tenant_id, q.get("object_type") or None, q.get("object_id") or None
    )
    return _ok(found)


# --- reconciliation ---------------------------------------------------------------------------


@router.post(
    "/v1/reconciliations",
    tags=["invoices"],
    **doc(
        ok={200: _json_or_csv(model(ReconciliationReport))},
        bodies={
            "application/json": model(ReconciliationIn, "validation"),
            "text/csv": {
                "type": "string",
                "description": "the other system's lines: customer_id,charge,group,quantity,amount",
            },
        },
        params=_RECON_QUERY,
    ),
)
async def reconciliation(
    request: Request,
    tenant_id: Tenant,
    st: State,
) -> Response:
    """The other system's lines as JSON (``{period_start, period_end, lines, amount_tolerance?}``)
    or as CSV (``Content-Type: text/csv``, the period in the query string)."""
    ctype = request.headers.get("content-type", "")
    if "csv" in ctype:
        raw = await read_body(request, MAX_RECON_BODY)
        q = request.query_params
        try:
            req = ReconciliationIn.model_validate(
                {
                    "period_start": q.get("period_start"),
                    "period_end": q.get("period_end"),
                    "lines": [],
                    **(
                        {"amount_tolerance": q["amount_tolerance"]}
                        if "amount_tolerance" in q
                        else {}
                    ),
                }
            )
        except pydantic.ValidationError as exc:
            err = ValidationError.from_pydantic(exc, "invalid request")
            raise ValidationError(summarize(err.details), details=err.details) from None
        lines = reconcile.parse_csv(raw.decode("utf-8-sig", errors="replace"))
    else:
        req = await _body(request, ReconciliationIn, "reconciliation")
        lines = list(req.lines)
    if req.period_end <= req.period_start:
        raise ValidationError(
            "period_end must be after period_start",
            details=[{"field": "period_end", "message": "not after period_start"}],
        )
    rows = billing(request, st).rows
    invoices = await st.run(
        rows.invoices, tenant_id, None, None, None, None, req.period_start, req.period_end
    )
    report = reconcile.diff(
        reconcile.tally_lines(invoices),
        lines,
        req.period_start,
        req.period_end,
        req.amount_tolerance,
    )
    if _wants_csv(request):
        return Response(reconcile.report_csv(report), media_type=CSV)
    return json_response(200, orjson.loads(report.model_dump_json()))


__all__ = ["ExternalLine", "_time", "admin_router", "router"]


_NOTE = ("post", "/v1/invoices/{invoice_id}/credit-notes", 201)
for _name, _method, _path in (
    ("GetCreditNote", "get", "/v1/credit-notes/{note_id}"),
    ("CreditNotePdf", "get", "/v1/credit-notes/{note_id}/pdf"),
):
    link(_NOTE, _name, _method, _path, {"note_id": "$response.body#/id"})
link(
    ("post", "/v1/customers/{customer_id}/discounts", 201),
    "DeleteDiscount",
    "delete",
    "/v1/customers/{customer_id}/discounts/{discount_id}",
    {"customer_id": "$response.body#/customer_id", "discount_id": "$response.body#/id"},
)
link(
    ("post", "/v1/events/{event_id}/corrections", 201),
    "EventCorrections",
    "get",
    "/v1/events/{event_id}/corrections",
    {"event_id": "$response.body#/event_id"},
)
