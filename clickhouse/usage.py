"""Run usage queries (``clickhouse.queries.usage_sql``) and convert the rows to ``UsageRow``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

from clickhouse.queries import stale_overrides_sql, usage_sql, usage_state_sql
from clickhouse.store import Store
from schemas.corrections import ADDITIVE
from schemas.meters import Meter
from schemas.usage import UsageQuery, UsageRow

log = logging.getLogger(__name__)


def _decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int):
        return Decimal(value)
    return Decimal(str(value))


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(int(seconds), UTC)


# (tenant id, meter, [(customer, minute window start)]) -> recompute those windows' overrides
Repair = Callable[[str, Meter, list[tuple[str, datetime]]], None]


def usage_values(
    store: Store, q: UsageQuery, repair: Repair | None = None, *, stream_only: bool = False
) -> list[UsageValue]:
    """Execute ``q``: rows ordered by window start, then customer, then the dimensions, as
    plain tuples (an invoice run reads tens of thousands; ``run_usage`` gives models).

    First one small statement (``usage_state_sql``): does the meter have a complete backfill
    run, and do corrections touch ``q``'s range? Neither (the common case): the stream's minute
    rows alone answer ``q`` (``usage_sql(stream_only=True)``). Otherwise event corrections and
    the visible run are part of the query (``clickhouse.queries.usage_source``). For
    min/max/unique_count/latest meters, minute windows whose override is missing or out of date
    (``stale_overrides_sql``: a crash after the correction, or late events since) are first
    recomputed by ``repair`` (``billing.corrections.Corrections.repair``, which has the worker's
    matching rules); without ``repair`` they are used as they are, with a warning.

    The two statements see the store at two moments a few milliseconds apart: a run completing
    or a correction landing in between shows from the next query on, as if it had come just
    after this one; no row is ever read twice or skipped (the branches add disjoint rows).

    ``stream_only=True``: the caller read a moment ago that the meter has neither a complete
    backfill run nor any correction (``schemas.usage.UsageMeter``), so the first statement is
    skipped: it is half the store's work of a small query (measured: 4.2 of 7.2 ms of chDB
    CPU for one customer over two hours). The stream's rows are read as they are now; a run or a
    correction that landed after the caller's read shows once the caller reads the meter again
    (the API's bound: docs/operations.md, "How fast a meter change takes effect")."""
    has_run = dirty = 0
    if not stream_only:
        ((has_run, dirty),) = store.query_rows(*usage_state_sql(q, store.database))
        stream_only = not int(has_run) and not int(dirty)
    overrides = True
    if not stream_only and q.meter.aggregation not in ADDITIVE:
        overrides = int(dirty) > 0
        if overrides:
            stale = [
                (str(c), _utc_dt(w))
                for c, w in store.query_rows(*stale_overrides_sql(q, store.database))
            ]
            if stale and repair is not None:
                repair(q.tenant_id, q.meter, stale)
            elif stale:
                log.warning(
                    "meter %s: %d corrected minute window(s) need recomputing; no repair given",
                    q.meter.slug,
                    len(stale),
                )
    sql, params = usage_sql(q, store.database, overrides=overrides, stream_only=stream_only)
    return _to_values(q, store.query_rows(sql, params))


def run_usage(store: Store, q: UsageQuery, repair: Repair | None = None) -> list[UsageRow]:
    """``usage_values`` as ``UsageRow`` models (the usage API)."""
    return [UsageRow(**v._asdict()) for v in usage_values(store, q, repair)]


def _utc_dt(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UsageValue(NamedTuple):
    """One row of a usage query (the fields of ``schemas.usage.UsageRow``)."""

    window_start: datetime
    window_end: datetime
    customer: str | None
    group_by: dict[str, str]
    value: Decimal | None


def _to_values(q: UsageQuery, rows: list[tuple]) -> list[UsageValue]:
    dims = q.dimensions
    out: list[UsageValue] = []
    for row in rows:
        i = 0
        if q.window is not None:
            start, end = _utc(row[1]), _utc(row[2])
            i = 3
        else:
            start, end = q.from_, q.to
        customer = None
        if q.per_customer:
            customer = row[i]
            i += 1
        group = {name: row[i + k] for k, name in enumerate(dims)}
        out.append(UsageValue(start, end, customer, group, _decimal(row[i + len(dims)])))
    return out
