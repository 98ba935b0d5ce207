"""Event corrections: void or amend an event by id (an append-only correction record, never an
edit of the ledger), reflected exactly in usage queries and invoices, for every aggregation.

**What counted the event.** A meter counts an event either in the stream (the event's log
position is after the meter's activation marker) or in backfill runs (before it). A correction
is applied to the side that counts the event, meter by meter (``Matching.contributions`` with
the activation rows: the worker's own rules).

**The log.** Corrections of a tenant are numbered 1, 2, ... (``seq``): a correction is claimed as
ONE insert of its record and its effect rows with the deduplication token (tenant, seq), and read
back; a claimer that lost the seq re-reads the event's state and tries the next one. So
corrections of one event chain correctly, and "corrections up to seq S" is a well-defined
snapshot: a backfill run applies exactly the corrections ``1 <= seq <= S`` in its scan (S read
when its boundary is fixed) and usage queries add, for the backfill side, only the effect rows
above the visible run's S. Whenever a run scanned the event, each correction counts once.

**Effects.**
- count, sum, avg: signed deltas of (events, value_count, value_sum) per (meter, group, side),
  added by usage queries;
- min, max, unique_count, latest (no delta can take a value out of a minimum): the event's
  minute window is marked dirty per (meter, group, side) and **recomputed from the ledger** with
  every correction applied (``repair``); usage queries read the recomputed window in place of
  its pre-aggregates. A recomputation records how many events the stream had pre-aggregated in
  the key; if late events arrive in the window later, the count differs and the window is
  recomputed before the next query uses it (``clickhouse.usage.run_usage``), as it is when a
  crash came between the correction and its recomputation.

A finalized period whose usage a correction changed is billed through late-usage adjustments or
a credit note (``billing.invoices``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from billing.audit import record
from billing.ports import BillingStore, Window
from schemas.billing import Correction, CorrectionAction, CorrectionIn
from schemas.corrections import (
    ADDITIVE,
    BACKFILL,
    STREAM,
    Effect,
    LedgerEvent,
    Markers,
    Override,
    WindowAggregate,
)
from schemas.meters import Meter
from schemas.timeutil import from_epoch_ms, utc_now
from tally.errors import Conflict

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
CLAIM_ATTEMPTS = 100


@dataclass(frozen=True)
class Contribution:
    """What one event adds to one meter (the stream worker's matching result) and which side
    counts it (``STREAM`` or ``BACKFILL``)."""

    meter: Meter
    side: str
    group_key: str
    group_values: dict[str, str]
    value: Decimal | None
    uniq: str | None = None


class Matching(Protocol):
    """The worker's matching and aggregation rules applied to stored events
    (``api.matching.WorkerMatching``; billing does not import the stream code)."""

    def contributions(
        self,
        meters: Sequence[Meter],
        event: LedgerEvent,
        properties: dict[str, Any],
        markers: dict[str, Markers],
    ) -> list[Contribution]: ...

    def windows(
        self,
        meter: Meter,
        events: Sequence[tuple[LedgerEvent, dict[str, Any] | None]],
        markers: Markers,
    ) -> dict[tuple[str, int, str, str], WindowAggregate]:
        """(customer, window ms, side, group key) -> the window's aggregate of ``events``
        (properties None: voided, not counted)."""
        ...


def effects(
    customer: str, time_ms: int, before: list[Contribution], after: list[Contribution]
) -> list[Effect]:
    """The effect rows of a correction (pure): per (meter, group, side) the signed change of
    (events, value_count, value_sum). Additive meters keep only rows that change something;
    the others keep every key the event leaves or enters (their window must be recomputed)."""
    window = from_epoch_ms(time_ms - time_ms % MINUTE_MS)
    rows: dict[tuple[str, str, str], list[Any]] = {}
    additive: dict[str, bool] = {}
    for sign, contribs in ((-1, before), (1, after)):
        for c in contribs:
            additive[c.meter.id] = c.meter.aggregation in ADDITIVE
            row = rows.setdefault(
                (c.meter.id, c.group_key, c.side), [dict(c.group_values), 0, 0, Decimal(0)]
            )
            row[1] += sign
            if c.value is not None:
                row[2] += sign
                row[3] += sign * c.value
    out = []
    for (meter_id, gk, side), (gv, n, vc, vs) in sorted(rows.items()):
        if additive[meter_id] and n == 0 and vc == 0 and vs == 0:
            continue
        out.append(Effect(meter_id, customer, window, gk, side, gv, n, vc, vs))
    return out


def _targets(contribs: list[Contribution]) -> list[dict[str, str]]:
    seen: dict[str, str] = {}
    for c in contribs:
        seen.setdefault(c.meter.slug, "stream" if c.side == STREAM else "backfill")
    return [{"meter": m, "origin": o} for m, o in sorted(seen.items())]


class Corrections:
    def __init__(self, rows: BillingStore, matching: Matching) -> None:
        self.rows = rows
        self.matching = matching

    def history(self, tenant_id: str, event_id: str) -> list[Correction]:
        self.rows.get_event(tenant_id, event_id)  # 404 for an unknown event
        return self.rows.corrections(tenant_id, event_id)

    def correct(
        self, tenant_id: str, event_id: str, req: CorrectionIn, actor: str = "api"
    ) -> Correction:
        event = self.rows.get_event(tenant_id, event_id)
        meters = [m for m in self.rows.list_meters(tenant_id) if m.event_type == event.type]
        markers = self.rows.activation_markers(tenant_id, [m.id for m in meters])
        new = req.properties if req.action is CorrectionAction.AMEND else None
        for _attempt in range(CLAIM_ATTEMPTS):
            # The newest seq first, then the event's state: if another correction is claimed in
            # between, it took seq top+1 and this claim loses (then everything is read again).
            top = self.rows.correction_top(tenant_id)
            history = self.rows.corrections(tenant_id, event_id)
            current: dict[str, Any] | None = event.properties
            if history:
                current = history[-1].properties_after
            if current is None:
                raise Conflict(
                    f"event {event_id} is already void; a void is final",
                    details=[{"field": "action", "message": "event already void"}],
                )
            before = self.matching.contributions(meters, event, current, markers)
            after = (
                self.matching.contributions(meters, event, new, markers) if new is not None else []
            )
            rows = effects(event.customer, event.time_ms, before, after)
            now = utc_now()
            correction = Correction(
                id="cor_" + uuid.uuid4().hex[:20],
                event_id=event_id,
                action=req.action,
                reason=req.reason,
                actor=actor,
                created_at=now,
                customer=event.customer,
                event_time=from_epoch_ms(event.time_ms),
                properties_before=current,
                properties_after=new,
                applied_meters=sorted({c.meter.slug for c in before + after}),
                unapplied_meters=[],
                seq=top + 1,
                targets=_targets(before + after),
            )
            if self.rows.claim_correction(tenant_id, correction, rows) == correction.id:
                break
        else:
            raise Conflict(
                "could not record the correction (too many concurrent corrections); retry",
                details=[{"field": "event_id", "message": "contention"}],
            )
        window = from_epoch_ms(event.time_ms - event.time_ms % MINUTE_MS)
        for meter in meters:
            if meter.aggregation not in ADDITIVE and any(e.meter_id == meter.id for e in rows):
                try:
                    self.repair(tenant_id, meter, [(event.customer, window)])
                except Exception:  # the next usage query recomputes it (stale check)
                    log.exception("tenant %s: recomputing corrected windows failed", tenant_id)
        record(
            self.rows,
            tenant_id,
            "event",
            event_id,
            f"correction.{req.action.value}",
            actor,
            {
                "correction_id": correction.id,
                "seq": correction.seq,
                "reason": req.reason,
                "applied": correction.applied_meters,
            },
            correction.created_at,
        )
        return correction

    def repair(self, tenant_id: str, meter: Meter, windows: Sequence[Window]) -> None:
        """Recompute the corrected keys of the given minute windows of ``meter`` from the ledger
        with every correction applied, and store them as overrides.

        Order of the reads: the newest seq first (the override reflects at least the
        corrections up to it), then the stream's pre-aggregated counts (every event counted
        there is already in the ledger, which the worker writes first), then the ledger."""
        top = self.rows.correction_top(tenant_id)
        dirty = self.rows.dirty_keys(tenant_id, meter.id, windows)
        if not dirty:
            return
        keys = list(dirty)
        base = self.rows.stream_counts(tenant_id, meter.id, keys)
        markers = self.rows.activation_markers(tenant_id, [meter.id]).get(meter.id, {})
        events = self.rows.ledger_window_events(tenant_id, meter.event_type, keys)
        fixed = self.rows.latest_corrections(tenant_id, [e.id for e in events])
        items = [(e, fixed[e.id] if e.id in fixed else e.properties) for e in events]
        aggs = self.matching.windows(meter, items, markers)
        out = []
        for (customer, window), groups in dirty.items():
            wms = int(window.timestamp() * 1000)
            for (gk, side), gv in groups.items():
                agg = aggs.get((customer, wms, side, gk)) or WindowAggregate(group_values=gv)
                n = base.get((customer, window, gk), 0) if side == STREAM else 0
                out.append(Override(meter.id, customer, window, gk, side, top, n, agg))
        self.rows.write_overrides(tenant_id, out)
        log.info(
            "tenant %s meter %s: recomputed %d corrected window key(s)",
            tenant_id,
            meter.slug,
            len(out),
        )


__all__ = ["BACKFILL", "STREAM", "Contribution", "Corrections", "Matching", "effects"]
