"""Apply a meter to history: the events stored before the meter existed.

The worker applies a meter to events ingested at or after the meter's ``created_at``; this job
covers the rest (``ingested_at < created_at``) from the ledger, with the same matching and
aggregation code as the worker. Rows get ``origin = 'b:<run id>'``; the meter's previous backfill
rows are replaced in the same step, so running it again never double-counts.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schemas.envelope import EnvelopeEvent
from schemas.meters import Meter
from schemas.timeutil import epoch_ms
from streams.aggregation import WindowTable
from streams.matching import CompiledMeter, ValueProblem

log = logging.getLogger(__name__)

ORIGIN_COLUMN = 5  # position of `origin` in a usage row


@dataclass(frozen=True)
class BackfillResult:
    run_id: str
    events_scanned: int
    events_matched: int
    value_problems: int
    windows: int


def backfill_meter(
    sink: Any, meter: Meter, progress: Callable[[int], None] | None = None
) -> BackfillResult:
    """Aggregate the meter over every event ingested before it was created; replace old rows."""
    compiled = CompiledMeter(meter)
    created_ms = epoch_ms(meter.created_at)
    table = WindowTable()
    scanned = matched = problems = 0
    for chunk in sink.iter_events(meter.tenant_id, meter.event_type, created_ms):
        for event_id, customer, time_ms, properties, _ingested_ms in chunk:
            ev = EnvelopeEvent(event_id, meter.event_type, customer, time_ms, properties)
            try:
                # Judge the event as if it arrived when the meter was created.
                c = compiled.match(ev, created_ms)
            except ValueProblem:
                problems += 1
                continue
            if c is not None:
                table.add(meter.tenant_id, customer, time_ms, event_id, c)
                matched += 1
        scanned += len(chunk)
        if progress is not None:
            progress(len(chunk))
    run_id = uuid.uuid4().hex[:12]
    rows = [
        (*row[:ORIGIN_COLUMN], f"b:{run_id}", *row[ORIGIN_COLUMN + 1 :]) for row in table.rows()
    ]
    sink.replace_backfill(meter.tenant_id, meter.id, run_id, rows)
    log.info(
        "backfill of meter %s (%s): %d events scanned, %d matched, %d windows",
        meter.slug,
        meter.tenant_id,
        scanned,
        matched,
        len(rows),
    )
    return BackfillResult(run_id, scanned, matched, problems, len(rows))
