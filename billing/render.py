"""Renderings of invoices and credit notes: JSON (the model), CSV (one row per line) and PDF.

PDF: ReportLab (BSD licensed, maintained since 2000, pure-Python wheels with no system
libraries: WeasyPrint would need Pango/Cairo from the OS, which a fresh machine or a slim
container does not have). The page shows the tenant's name, the customer, the period, every
line with its tax, the taxes per rate and the total; text is real text (searchable,
extractable with ``pdftotext``).
"""

from __future__ import annotations

import csv
import io
from decimal import Decimal

from schemas.billing import CreditNote, Invoice, InvoiceLine

CSV_COLUMNS = [
    "document",
    "number",
    "customer_id",
    "line",
    "kind",
    "description",
    "period_start",
    "period_end",
    "quantity",
    "unit_amount",
    "amount",
    "tax",
    "currency",
]


def _dt(value: object) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else ""


def to_csv(doc: Invoice | CreditNote) -> str:
    """One row per line, then ``subtotal``, ``tax`` and ``total`` rows (amounts as decimals)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    number = doc.number or ""
    for i, ln in enumerate(doc.lines):
        w.writerow(
            [
                doc.id,
                number,
                doc.customer_id,
                i,
                ln.kind,
                ln.description,
                _dt(ln.period_start),
                _dt(ln.period_end),
                str(ln.quantity),
                "" if ln.unit_amount is None else str(ln.unit_amount),
                str(ln.amount),
                str(ln.tax),
                ln.currency,
            ]
        )
    for label, amount in (("subtotal", doc.subtotal), ("tax", doc.tax), ("total", doc.total)):
        w.writerow(
            [
                doc.id,
                number,
                doc.customer_id,
                "",
                label,
                "",
                "",
                "",
                "",
                "",
                str(amount),
                "",
                doc.currency,
            ]
        )
    return out.getvalue()


def money(amount: Decimal, currency: str) -> str:
    """``1,234.50 USD`` (thousands separated, the amount's own decimals)."""
    sign = "-" if amount < 0 else ""
    whole, _, frac = f"{abs(amount):f}".partition(".")
    grouped = f"{int(whole):,}"
    return f"{sign}{grouped}{'.' + frac if frac else ''} {currency}"


def _qty(q: Decimal) -> str:
    text = f"{q.normalize():f}" if q == q.to_integral_value() else f"{q:f}".rstrip("0")
    return text or "0"


def to_pdf(doc: Invoice | CreditNote) -> bytes:
    from xml.sax.saxutils import escape

    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    is_invoice = isinstance(doc, Invoice)
    buf = io.BytesIO()
    title = ("Invoice" if is_invoice else "Credit note") + (
        f" {doc.number}" if doc.number else " (draft)"
    )
    pdf = SimpleDocTemplate(
        buf,
        pagesize=A4,
        title=title,
        author=doc.contract.tenant_name or "Tally",
        leftMargin=18 * mm,
        rightMargin=18 * mm,
        topMargin=18 * mm,
        bottomMargin=18 * mm,
    )
    styles = getSampleStyleSheet()
    small = styles["BodyText"].clone("small", fontSize=8, leading=10)
    story: list = [
        Paragraph(escape(doc.contract.tenant_name or "Tally"), styles["Title"]),
        Paragraph(escape(title), styles["Heading2"]),
    ]
    facts = [
        ["Customer", f"{doc.contract.customer_name} ({doc.customer_id})"],
        ["Document id", doc.id],
    ]
    if isinstance(doc, Invoice):
        facts += [
            ["Status", doc.status.value],
            [
                "Period",
                f"{doc.period_start.date().isoformat()} to {doc.period_end.date().isoformat()}"
                f" ({doc.period_start.isoformat()} - {doc.period_end.isoformat()})",
            ],
        ]
        if doc.void_reason:
            facts.append(["Void", doc.void_reason])
    else:
        facts += [["Credits invoice", doc.invoice_number or doc.invoice_id], ["Reason", doc.reason]]
    facts.append(
        ["Currency", doc.currency + (" (prices include tax)" if doc.tax_inclusive else "")]
    )
    t = Table(
        [[Paragraph(f"<b>{escape(a)}</b>", small), Paragraph(escape(b), small)] for a, b in facts],
        colWidths=[35 * mm, 139 * mm],
    )
    story += [t, Spacer(1, 6 * mm)]

    rows = [["Description", "Period", "Qty", "Unit", "Amount", "Tax"]]
    for ln in doc.lines:
        rows.append(_line_row(ln, doc.currency, small))
        for part in ln.breakdown:
            if part.amount == 0 and part.quantity is None:
                continue
            label = part.label + (
                f": {_qty(part.quantity)} x {part.unit_amount}"
                if part.quantity is not None and part.unit_amount is not None
                else ""
            )
            rows.append(
                [
                    Paragraph("&nbsp;&nbsp;&nbsp;" + escape(label), small),
                    "",
                    "",
                    "",
                    str(part.amount),
                    "",
                ]
            )
    table = Table(
        rows, colWidths=[72 * mm, 30 * mm, 18 * mm, 16 * mm, 24 * mm, 14 * mm], repeatRows=1
    )
    table.setStyle(
        TableStyle(
            [
                ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
                ("FONTSIZE", (0, 0), (-1, -1), 8),
                ("LINEBELOW", (0, 0), (-1, 0), 0.5, colors.black),
                ("ALIGN", (2, 0), (-1, -1), "RIGHT"),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ]
        )
    )
    story += [table, Spacer(1, 6 * mm)]
    sums = [
        ["Subtotal" + (" (net)" if doc.tax_inclusive else ""), money(doc.subtotal, doc.currency)]
    ]
    for tax in doc.taxes:
        sums.append(
            [
                f"{tax.name} {tax.rate}%" + (" (included)" if doc.tax_inclusive else ""),
                money(tax.amount, doc.currency),
            ]
        )
    sums.append(["Tax", money(doc.tax, doc.currency)])
    sums.append(["Total" if is_invoice else "Total credited", money(doc.total, doc.currency)])
    st = Table(sums, colWidths=[140 * mm, 34 * mm])
    st.setStyle(
        TableStyle(
            [
                ("ALIGN", (1, 0), (1, -1), "RIGHT"),
                ("FONTNAME", (0, -1), (-1, -1), "Helvetica-Bold"),
                ("LINEABOVE", (0, -1), (-1, -1), 0.8, colors.black),
            ]
        )
    )
    story.append(st)
    pdf.build(story)
    return buf.getvalue()


def _line_row(ln: InvoiceLine, currency: str, style: object) -> list:
    from xml.sax.saxutils import escape

    from reportlab.platypus import Paragraph

    period = ""
    if ln.period_start and ln.period_end:
        period = f"{ln.period_start.date().isoformat()} - {ln.period_end.date().isoformat()}"
    desc = ln.description + (
        f" [{', '.join(f'{k}={v}' for k, v in ln.group.items())}]" if ln.group else ""
    )
    return [
        Paragraph(escape(desc), style),
        Paragraph(period, style),
        _qty(ln.quantity),
        "" if ln.unit_amount is None else str(ln.unit_amount),
        str(ln.amount),
        str(ln.tax),
    ]
