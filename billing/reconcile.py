"""Reconciliation (shadow billing): another system's invoice lines for a period against Tally's,
as a line-item diff report (pure, except ``tally_lines`` which reads the invoices).

Lines are matched on ``(customer_id, charge, group)``: ``charge`` is the plan charge key (for
Tally lines without one: their kind, e.g. ``discount``), ``group`` the group values as
``k=v,k2=v2`` ('' when none). Quantities and amounts of lines with the same key are added up.
A key is:

- ``matched`` when amounts agree (within ``amount_tolerance``) and quantities agree (when the
  other system gave one);
- ``missing`` when Tally billed it and the other system has no line for it;
- ``extra`` when the other system has it and Tally did not bill it;
- ``quantity_mismatch`` / ``amount_mismatch`` otherwise (quantity is checked first).

``match_rate`` = matched keys / all keys x 100, rounded half-up to 2 decimals (100 when both
sides are empty). Totals are the sums of amounts on each side.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

import orjson

from schemas.billing import (
    DiffLine,
    DiffStatus,
    ExternalLine,
    Invoice,
    InvoiceStatus,
    ReconciliationReport,
)
from tally.errors import ValidationError

Key = tuple[str, str, str]


def group_text(group: dict[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((group or {}).items()))


def tally_lines(invoices: Iterable[Invoice]) -> list[ExternalLine]:
    """Tally's side: every line of every non-void invoice, as comparable lines."""
    out = []
    for inv in invoices:
        if inv.status is InvoiceStatus.VOID:
            continue
        for ln in inv.lines:
            out.append(
                ExternalLine(
                    customer_id=inv.customer_id,
                    charge=ln.charge_key or ln.kind,
                    group=group_text(ln.group),
                    quantity=ln.quantity,
                    amount=ln.amount,
                )
            )
    return out


def _sum(lines: Iterable[ExternalLine]) -> dict[Key, tuple[Decimal | None, Decimal]]:
    out: dict[Key, tuple[Decimal | None, Decimal]] = {}
    for ln in lines:
        key = (ln.customer_id, ln.charge, ln.group)
        q0, a0 = out.get(key, (Decimal(0), Decimal(0)))
        q = (
            None
            if ln.quantity is None or (key in out and q0 is None)
            else (q0 or Decimal(0)) + ln.quantity
        )
        out[key] = (q, a0 + ln.amount)
    return out


def diff(
    tally: Sequence[ExternalLine],
    other: Sequence[ExternalLine],
    period_start: datetime,
    period_end: datetime,
    amount_tolerance: Decimal = Decimal(0),
) -> ReconciliationReport:
    mine, theirs = _sum(tally), _sum(other)
    lines: list[DiffLine] = []
    for key in sorted(set(mine) | set(theirs)):
        tq, ta = mine.get(key, (None, None))
        oq, oa = theirs.get(key, (None, None))
        if ta is None:
            status = DiffStatus.EXTRA
        elif oa is None:
            status = DiffStatus.MISSING
        elif oq is not None and tq is not None and tq != oq:
            status = DiffStatus.QUANTITY_MISMATCH
        elif abs(ta - oa) > amount_tolerance:
            status = DiffStatus.AMOUNT_MISMATCH
        else:
            status = DiffStatus.MATCHED
        lines.append(
            DiffLine(
                customer_id=key[0],
                charge=key[1],
                group=key[2],
                status=status,
                tally_quantity=tq,
                other_quantity=oq,
                tally_amount=ta,
                other_amount=oa,
                amount_difference=(ta or Decimal(0)) - (oa or Decimal(0)),
            )
        )
    counts = {s.value: sum(1 for ln in lines if ln.status is s) for s in DiffStatus}
    rate = (
        (Decimal(counts["matched"]) * 100 / Decimal(len(lines))).quantize(
            Decimal("0.01"), rounding=ROUND_HALF_UP
        )
        if lines
        else Decimal("100.00")
    )
    t_total = sum((ln.amount for ln in tally), Decimal(0))
    o_total = sum((ln.amount for ln in other), Decimal(0))
    return ReconciliationReport(
        period_start=period_start,
        period_end=period_end,
        lines=lines,
        counts=counts,
        tally_total=t_total,
        other_total=o_total,
        difference=t_total - o_total,
        match_rate=rate,
    )


REPORT_COLUMNS = [
    "customer_id",
    "charge",
    "group",
    "status",
    "tally_quantity",
    "other_quantity",
    "tally_amount",
    "other_amount",
    "amount_difference",
]


def report_csv(report: ReconciliationReport) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(REPORT_COLUMNS)
    for ln in report.lines:
        w.writerow(
            [
                ""
                if getattr(ln, c) is None
                else str(getattr(ln, c).value if c == "status" else getattr(ln, c))
                for c in REPORT_COLUMNS
            ]
        )
    w.writerow(
        [
            "",
            "",
            "",
            "total",
            "",
            "",
            str(report.tally_total),
            str(report.other_total),
            str(report.difference),
        ]
    )
    w.writerow(["", "", "", f"match_rate={report.match_rate}", "", "", "", "", ""])
    return out.getvalue()


def _dec(value: str, field: str) -> Decimal:
    try:
        d = Decimal(value.strip())
    except (InvalidOperation, AttributeError):
        raise ValidationError(
            f"{field}: not a decimal number ({value!r})",
            details=[{"field": field, "message": "not a decimal number"}],
        ) from None
    if not d.is_finite():
        raise ValidationError(
            f"{field}: not finite", details=[{"field": field, "message": "not finite"}]
        )
    return d


def parse_csv(text: str) -> list[ExternalLine]:
    """CSV with a header: ``customer_id, charge, amount`` required; ``quantity``, ``group``
    optional. Errors name the row (``lines.<n>.<column>``, n counting data rows from 0)."""
    reader = csv.DictReader(io.StringIO(text))
    cols = set(reader.fieldnames or [])
    missing = {"customer_id", "charge", "amount"} - cols
    if missing:
        raise ValidationError(
            f"CSV header lacks {', '.join(sorted(missing))}",
            details=[
                {"field": f"header.{m}", "message": "missing column"} for m in sorted(missing)
            ],
        )
    out = []
    for i, row in enumerate(reader):
        q = (row.get("quantity") or "").strip()
        if not (row.get("customer_id") or "").strip() or not (row.get("charge") or "").strip():
            raise ValidationError(
                f"lines.{i}: customer_id and charge are required",
                details=[{"field": f"lines.{i}.customer_id", "message": "required"}],
            )
        out.append(
            ExternalLine(
                customer_id=row["customer_id"].strip(),
                charge=row["charge"].strip(),
                group=(row.get("group") or "").strip(),
                quantity=_dec(q, f"lines.{i}.quantity") if q else None,
                amount=_dec(row.get("amount") or "", f"lines.{i}.amount"),
            )
        )
    return out


def parse_json_lines(raw: bytes) -> list[dict]:
    data = orjson.loads(raw)
    if not isinstance(data, list):
        raise ValidationError(
            "expected a JSON array of lines",
            details=[{"field": "lines", "message": "not an array"}],
        )
    return data
