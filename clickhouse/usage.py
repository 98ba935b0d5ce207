"""Run usage queries (``clickhouse.queries.usage_sql``) and convert the rows to ``UsageRow``."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from clickhouse.queries import corrections_sql, usage_sql
from clickhouse.store import Store
from schemas.usage import UsageQuery, UsageRow


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


def run_usage(store: Store, q: UsageQuery) -> list[UsageRow]:
    """Execute ``q``: rows ordered by window start, then customer, then the dimensions.

    Event corrections (``usage_corrections``, signed deltas of count/sum meters) are read by a
    separate query and added to the matching rows (``_with_corrections``)."""
    sql, params = usage_sql(q, store.database)
    rows = store.query_rows(sql, params)
    corr = corrections_sql(q, store.database)
    if corr is not None:
        rows = _with_corrections(rows, store.query_rows(*corr))
    return _to_usage_rows(q, rows)


def _with_corrections(rows: list[tuple], deltas: list[tuple]) -> list[tuple]:
    """Add each delta row's value (last column) to the row with the same key (all the other
    columns); a delta without a row becomes a row. Order is kept (new keys sorted after)."""
    if not deltas:
        return rows
    index = {tuple(r[:-1]): i for i, r in enumerate(rows)}
    out = [list(r) for r in rows]
    extra: list[list[Any]] = []
    for d in deltas:
        i = index.get(tuple(d[:-1]))
        if i is None:
            extra.append(list(d))
        else:
            base = _decimal(out[i][-1]) or Decimal(0)
            out[i][-1] = base + (_decimal(d[-1]) or Decimal(0))
    merged = [tuple(r) for r in out] + [tuple(r) for r in sorted(extra, key=lambda r: r[:-1])]
    return merged


def _to_usage_rows(q: UsageQuery, rows: list[tuple]) -> list[UsageRow]:
    dims = q.dimensions
    out: list[UsageRow] = []
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
        out.append(
            UsageRow(
                window_start=start,
                window_end=end,
                customer=customer,
                group_by=group,
                value=_decimal(row[i + len(dims)]),
            )
        )
    return out
