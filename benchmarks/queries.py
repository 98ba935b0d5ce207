"""The common usage-query shapes, timed over HTTP (native and OpenMeter APIs) and, as the floor,
the same queries run directly on the store (``clickhouse.usage.usage_values``, no HTTP, no API).

Shapes (range: the last 30 days, whole UTC days):

- ``customer_month_by_day``: one customer, one month, one value per day;
- ``tenant_by_customer``: the whole tenant, one total per customer for the month; the client
  keeps the top N (the API returns every customer, so the cost is the full group-by).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from benchmarks.jobs import Progress
from benchmarks.target import BenchError, fmt
from benchmarks.workload import Zipf, customer_name

TOP_N = 10
MIN_N = 20  # a time budget never cuts a shape below this many measured queries


@dataclass(frozen=True)
class Shape:
    name: str
    api: str  # native | openmeter
    kind: str  # customer_month_by_day | tenant_by_customer
    meter: str
    aggregation: str


SHAPES: list[Shape] = [
    Shape("native.customer_month_by_day.sum", "native", "customer_month_by_day", "tokens", "sum"),
    Shape(
        "native.customer_month_by_day.unique_count",
        "native",
        "customer_month_by_day",
        "users",
        "unique_count",
    ),
    Shape("native.tenant_by_customer.count", "native", "tenant_by_customer", "requests", "count"),
    Shape(
        "native.tenant_by_customer.unique_count",
        "native",
        "tenant_by_customer",
        "users",
        "unique_count",
    ),
    Shape(
        "openmeter.customer_month_by_day.sum",
        "openmeter",
        "customer_month_by_day",
        "tokens",
        "sum",
    ),
    Shape(
        "openmeter.tenant_by_customer.unique_count",
        "openmeter",
        "tenant_by_customer",
        "users",
        "unique_count",
    ),
]


def month_range(now: datetime) -> tuple[datetime, datetime]:
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=30), day + timedelta(days=1)


def plan(n: int, tenants: int, customers: int, zipf_s: float, seed: int) -> list[tuple[int, str]]:
    """(tenant index, customer) of the i-th query: customers drawn by the Zipf law, like traffic."""
    rnd = random.Random(seed)
    z = Zipf(customers, zipf_s)
    return [(i % tenants, customer_name(z.sample(rnd))) for i in range(n)]


def round_robin(
    names: list[str],
    n_queries: int,
    warmup: int,
    budget_s: float | None,
    run: Callable[[str, int], tuple[float, int]],
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, tuple[list[float], list[int]]]:
    """Time the i-th query of every shape, then the (i+1)-th, and so on (``run(name, i)`` ->
    (seconds, rows)), so that no shape alone pays the store's cold start after a restart (the
    shape measured first used to). The first ``warmup`` queries of each shape are not kept. A
    shape whose queries took ``budget_s`` in all stops once ``MIN_N`` are kept (slow shapes at
    large volumes); the others go on. Returns each shape's kept (seconds, rows)."""
    kept: dict[str, tuple[list[float], list[int]]] = {name: ([], []) for name in names}
    spent = dict.fromkeys(names, 0.0)
    total, done = len(names) * n_queries, 0
    for i in range(n_queries):
        for name in names:
            lat, rows = kept[name]
            if budget_s is not None and len(lat) >= MIN_N and spent[name] > budget_s:
                continue
            dt, got = run(name, i)
            spent[name] += dt
            if i >= warmup:
                lat.append(dt)
                rows.append(got)
            done += 1
            if progress is not None:
                progress(done, total, name)
    return kept


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(lat: list[float], rows: list[int]) -> dict[str, float]:
    return {
        "n": len(lat),
        "p50_s": pct(lat, 0.5),
        "p99_s": pct(lat, 0.99),
        "mean_s": statistics.fmean(lat),
        "rows_mean": statistics.fmean(rows) if rows else 0.0,
    }


def http_request(
    shape: Shape, frm: datetime, to: datetime, customer: str
) -> tuple[str, dict[str, Any]]:
    """(path, params) of one query of ``shape``."""
    f, t = fmt(frm), fmt(to)
    if shape.api == "native":
        path = f"/v1/meters/{shape.meter}/usage"
        if shape.kind == "customer_month_by_day":
            return path, {"customer": customer, "from": f, "to": t, "window": "DAY"}
        return path, {"group_by": "customer", "from": f, "to": t}
    path = f"/api/v1/meters/{shape.meter}/query"
    if shape.kind == "customer_month_by_day":
        return path, {"subject": customer, "from": f, "to": t, "windowSize": "DAY"}
    return path, {"groupBy": "subject", "from": f, "to": t}


def _top(rows: list[dict[str, Any]], api: str) -> list[Any]:
    key = "customer" if api == "native" else "subject"
    ranked = sorted(rows, key=lambda r: float(r.get("value") or 0), reverse=True)
    return [r.get(key) for r in ranked[:TOP_N]]


def time_http(
    url: str,
    keys: list[str],
    n: int,
    warmup: int,
    customers: int,
    zipf_s: float,
    seed: int,
    progress: Progress | None = None,
    budget_s: float | None = None,
) -> dict[str, dict[str, float]]:
    """p50/p99 of every shape over HTTP, one sequential client. ``budget_s``: per shape, stop
    after this many seconds once ``MIN_N`` queries are measured (slow shapes at large volumes)."""
    frm, to = month_range(datetime.now(UTC))
    queries = plan(n + warmup, len(keys), customers, zipf_s, seed)
    shapes = {shape.name: shape for shape in SHAPES}
    with httpx.Client(timeout=120) as client:

        def run(name: str, i: int) -> tuple[float, int]:
            shape = shapes[name]
            ti, cust = queries[i]
            path, params = http_request(shape, frm, to, cust)
            t = time.perf_counter()
            r = client.get(
                url + path, params=params, headers={"Authorization": f"Bearer {keys[ti]}"}
            )
            dt = time.perf_counter() - t
            if r.status_code != 200:
                raise BenchError(f"{shape.name}: {r.status_code} {r.text[:300]}")
            data = r.json()["data"]
            if shape.kind == "tenant_by_customer":
                _top(data, shape.api)
            return dt, len(data)

        kept = round_robin(list(shapes), len(queries), warmup, budget_s, run, progress)
    return {name: summary(lat, rows) for name, (lat, rows) in kept.items()}


def direct_query_fn(
    store: Any, tenant_id: str, shape: Shape, customer: str, meters: dict[tuple[str, str], Any]
) -> Callable[[], int]:
    """A function running ``shape`` straight on the store (the API's own query code path)."""
    from clickhouse.repo import Repo
    from clickhouse.usage import usage_values
    from schemas.usage import UsageQuery

    meter = meters.get((tenant_id, shape.meter))
    if meter is None:
        meter = meters[(tenant_id, shape.meter)] = Repo(store).get_meter(tenant_id, shape.meter)
    frm, to = month_range(datetime.now(UTC))
    per_customer = shape.kind == "customer_month_by_day"
    q = UsageQuery.model_validate(
        {
            "tenant_id": tenant_id,
            "meter": meter,
            "from": frm,
            "to": to,
            "window": "DAY" if per_customer else None,
            "tz": "UTC",
            "customers": [customer] if per_customer else [],
            "group_by": [],
            "filters": {},
            "by_customer": True,
        }
    )
    return lambda: len(usage_values(store, q))


def time_direct(
    store: Any,
    tenant_ids: list[str],
    n: int,
    warmup: int,
    customers: int,
    zipf_s: float,
    seed: int,
    progress: Progress | None = None,
    budget_s: float | None = None,
) -> dict[str, dict[str, float]]:
    """p50/p99 of every shape run on the store directly (no HTTP): the floor of the API's."""
    queries = plan(n + warmup, len(tenant_ids), customers, zipf_s, seed)
    shapes = {direct_key(s): s for s in SHAPES}  # one per (kind, meter, aggregation)
    meters: dict[tuple[str, str], Any] = {}

    def run(key: str, i: int) -> tuple[float, int]:
        ti, cust = queries[i]
        fn = direct_query_fn(store, tenant_ids[ti], shapes[key], cust, meters)
        t = time.perf_counter()
        got = fn()
        return time.perf_counter() - t, got

    def shown(done: int, total: int, key: str) -> None:
        if progress is not None:
            progress(done, total, "direct " + key)

    kept = round_robin(list(shapes), len(queries), warmup, budget_s, run, shown)
    return {key: summary(lat, rows) for key, (lat, rows) in kept.items()}


def direct_key(shape: Shape) -> str:
    return f"{shape.kind}.{shape.aggregation}"
