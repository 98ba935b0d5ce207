"""Event corrections: void or amend an event by id (an append-only correction record, never an
edit of the ledger), reflected in usage queries and invoices.

A correction takes the event's current contribution to every meter out and (for ``amend``)
the new one in, as signed per-minute deltas in ``usage_corrections``, which usage queries add
to the pre-aggregates (``clickhouse.queries.corrections_sql``). That is exact for the additive
aggregations (count, sum); meters with another aggregation (min, max, avg, unique_count,
latest) cannot be corrected by a delta and are listed in ``unapplied_meters``. A finalized
period whose usage a correction changed is billed through late-usage adjustments or a credit
note (``billing.invoices``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from billing.audit import record
from billing.ports import BillingStore
from schemas.billing import Correction, CorrectionAction, CorrectionIn
from schemas.meters import Aggregation, Meter
from schemas.timeutil import epoch_ms, from_epoch_ms, utc_now
from tally.errors import Conflict

ADDITIVE = {Aggregation.COUNT, Aggregation.SUM}
MINUTE_MS = 60_000


@dataclass(frozen=True)
class Contribution:
    """What one event adds to one meter (the stream worker's matching result)."""

    meter: Meter
    group_key: str
    group_values: dict[str, str]
    value: Decimal | None


Matcher = Callable[[list[Meter], dict[str, Any], dict[str, Any]], list[Contribution]]


def deltas(
    correction_id: str,
    customer: str,
    time_ms: int,
    before: list[Contribution],
    after: list[Contribution],
) -> tuple[list[tuple[Any, ...]], list[str], list[dict[str, str]]]:
    """Signed ``usage_corrections`` rows (without tenant), the applied meter slugs and the
    meters that could not be corrected (pure)."""
    window = from_epoch_ms(time_ms - time_ms % MINUTE_MS)
    rows: dict[tuple[str, str], list[Any]] = {}
    applied: set[str] = set()
    unapplied: dict[str, str] = {}
    for sign, contribs in ((-1, before), (1, after)):
        for c in contribs:
            if c.meter.aggregation not in ADDITIVE:
                unapplied[c.meter.slug] = (
                    f"aggregation {c.meter.aggregation.value} is not additive; "
                    "it is not corrected (see docs/invoicing.md)"
                )
                continue
            applied.add(c.meter.slug)
            key = (c.meter.id, c.group_key)
            row = rows.setdefault(
                key,
                [
                    c.meter.id,
                    customer,
                    window,
                    c.group_key,
                    correction_id,
                    c.group_values,
                    0,
                    Decimal(0),
                ],
            )
            row[6] += sign
            row[7] += sign * (c.value or Decimal(0))
    out = [tuple(r) for r in rows.values() if r[6] != 0 or r[7] != 0]
    return (
        out,
        sorted(applied),
        [{"meter": m, "reason": r} for m, r in sorted(unapplied.items())],
    )


class Corrections:
    def __init__(self, rows: BillingStore, matcher: Matcher) -> None:
        self.rows = rows
        self.matcher = matcher

    def history(self, tenant_id: str, event_id: str) -> list[Correction]:
        self.rows.get_event(tenant_id, event_id)  # 404 for an unknown event
        return self.rows.corrections(tenant_id, event_id)

    def correct(
        self, tenant_id: str, event_id: str, req: CorrectionIn, actor: str = "api"
    ) -> Correction:
        event = self.rows.get_event(tenant_id, event_id)
        history = self.rows.corrections(tenant_id, event_id)
        current: dict[str, Any] | None = event["properties"]
        if history:
            current = history[-1].properties_after
        if current is None:
            raise Conflict(
                f"event {event_id} is already void; a void is final",
                details=[{"field": "action", "message": "event already void"}],
            )
        meters = self.rows.list_meters(tenant_id)
        before = self.matcher(meters, event, current)
        new = req.properties if req.action is CorrectionAction.AMEND else None
        after = self.matcher(meters, event, new) if new is not None else []
        correction_id = "cor_" + uuid.uuid4().hex[:20]
        rows, applied, unapplied = deltas(
            correction_id, event["customer"], epoch_ms(event["time"]), before, after
        )
        now = utc_now()
        correction = Correction(
            id=correction_id,
            event_id=event_id,
            action=req.action,
            reason=req.reason,
            actor=actor,
            created_at=now,
            customer=event["customer"],
            event_time=event["time"],
            properties_before=current,
            properties_after=new,
            applied_meters=applied,
            unapplied_meters=unapplied,
        )
        self.rows.insert_correction(tenant_id, correction, rows)
        record(
            self.rows,
            tenant_id,
            "event",
            event_id,
            f"correction.{req.action.value}",
            actor,
            {"correction_id": correction_id, "reason": req.reason, "applied": applied},
            now,
        )
        return correction
