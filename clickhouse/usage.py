"""Run usage queries (``clickhouse.queries.usage_sql``) and convert the rows to ``UsageRow``."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from clickhouse.queries import usage_sql
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
    """Execute ``q``: rows ordered by window start, then customer, then the dimensions."""
    sql, params = usage_sql(q, store.database)
    dims = q.dimensions
    out: list[UsageRow] = []
    for row in store.query_rows(sql, params):
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
