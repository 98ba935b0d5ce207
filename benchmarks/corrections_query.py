"""Usage-query cost of exact corrections (docs/performance.md, "Corrections").

Embedded chDB; one tenant, 1,000 customers; a ``count`` meter and a ``max`` meter with
2,000 minute rows per customer each over 30 days (2M rows per meter, 4M in ``usage_minute``:
at ~25 events per row, ~100M events). Then 0, 100, 1,000 and 10,000 corrections: effect rows
in ``corrections`` (a -1 delta of the count meter; a dirty key of the max meter) and, for the
max meter, the recomputed windows in ``usage_overrides`` (up to date, so the stale check finds
nothing to recompute).

Measured (median and p95 of 30 runs after a warm-up), two query shapes:

- ``month_by_customer``: the month's total per customer (1,000 rows out, every row read);
- ``one_customer_daily``: one customer, daily windows.

Also the correction itself (``Corrections.correct``, a void) with 2M events in the tenant's
ledger: for a count meter (its effect rows) and for a max meter (plus the recomputation of the
event's minute window from the ledger).

``before``: the SQL of issue 10 (pre-aggregates only, plus for count/sum a second query of the
separate ``usage_corrections`` deltas, as ``run_usage`` ran it); ``after``: ``run_usage`` now
(corrections inside the statement; for min/max/unique_count/latest the stale check first).

    .venv/bin/python benchmarks/corrections_query.py [--quick]

Writes benchmarks/results/corrections_query.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clickhouse.backfill import backfill_origin_sql  # noqa: E402
from clickhouse.corrections import CORRECTION_COLUMNS, OVERRIDE_COLUMNS, override_version  # noqa: E402
from clickhouse.queries import usage_source, usage_sql  # noqa: E402
from clickhouse.rollup import day_rows_sql  # noqa: E402
from clickhouse.sink import USAGE_COLUMNS, unique_insert_settings  # noqa: E402
from clickhouse.store import Store  # noqa: E402
from clickhouse.usage import run_usage  # noqa: E402
from schemas.meters import Aggregation, Meter  # noqa: E402
from schemas.usage import UsageQuery, WindowSize  # noqa: E402

TENANT = "bench"
START = datetime(2025, 5, 1, tzinfo=UTC)
END = START + timedelta(days=30)
RUNS = 30

# Issue 10's source (pre-aggregates: the stream's rows and the visible backfill run's).
_OLD_COLUMNS = (
    "tenant_id, meter_id, customer, window_start, group_key, group_values, events, value_count, "
    "value_sum, value_min, value_max, uniq_values, latest"
)


def old_source(db: str) -> str:
    visible = backfill_origin_sql(db)
    key = "tenant_id = {tenant:String} AND meter_id = {meter:String}"
    return (
        f"(SELECT {_OLD_COLUMNS} FROM {db}.usage_minute WHERE {key} "
        f"AND origin IN ('s', {visible}) "
        f"UNION ALL SELECT {_OLD_COLUMNS} FROM {db}.usage_backfill WHERE {key} "
        f"AND origin = {visible})"
    )


def old_queries(q: UsageQuery, db: str) -> list[tuple[str, dict[str, Any]]]:
    """Issue 10: the pre-aggregate query and, for count/sum, the same query over the separate
    ``usage_corrections`` deltas (whose values ``run_usage`` then added in Python)."""
    sql, params = usage_sql(q, db, overrides=False)
    new_source = usage_source(db, q.meter.aggregation, overrides=False)
    assert new_source in sql
    sql = sql.replace(new_source, old_source(db)).replace(" HAVING sum(events) > 0", "")
    out = [(sql, params)]
    if q.meter.aggregation in (Aggregation.COUNT, Aggregation.SUM):
        out.append((sql.replace(old_source(db), f"{db}.usage_corrections FINAL"), params))
    return out


def meter(mid: str, agg: Aggregation) -> Meter:
    return Meter.model_validate(
        {
            "id": mid,
            "tenant_id": TENANT,
            "slug": mid,
            "event_type": "e",
            "aggregation": agg,
            "value_property": None if agg is Aggregation.COUNT else "$.v",
            "created_at": START,
        }
    )


def seed_usage(store: Store, meters: list[Meter], customers: int, per: int) -> float:
    t0 = time.perf_counter()
    rnd = random.Random(1)
    minutes = 30 * 24 * 60
    for m in meters:
        cols: dict[str, list[Any]] = {c: [] for c in USAGE_COLUMNS}
        for c in range(customers):
            for k in sorted(rnd.sample(range(minutes), per)):
                v = Decimal(rnd.randint(1, 5000))
                n = rnd.randint(1, 50)
                row: tuple[Any, ...] = (
                    TENANT,
                    m.id,
                    f"c{c:04d}",
                    START + timedelta(minutes=k),
                    "",
                    "s",
                    {},
                    n,
                    n,
                    v * n,
                    v,
                    v,
                    [],
                    (0, "", Decimal(0)),
                    0,
                )
                for name, value in zip(USAGE_COLUMNS, row, strict=True):
                    cols[name].append(value)
            if len(cols["tenant_id"]) >= 500_000 or c == customers - 1:
                store.insert(
                    "usage_minute",
                    [cols[n] for n in USAGE_COLUMNS],
                    USAGE_COLUMNS,
                    unique_insert_settings(),
                    column_oriented=True,
                )
                cols = {c: [] for c in USAGE_COLUMNS}
    store.command(day_rows_sql(store.database))  # their day rows, as the worker writes them
    return time.perf_counter() - t0


def seed_corrections(store: Store, count_m: Meter, max_m: Meter, n: int, first_seq: int) -> None:
    """``n`` corrections of existing windows (as the correction use-case writes them)."""
    db = store.database
    keys = store.query_rows(
        f"SELECT customer, window_start, sum(events) FROM {db}.usage_minute "
        "WHERE tenant_id = {t:String} AND meter_id = {m:String} "
        "GROUP BY customer, window_start ORDER BY cityHash64(customer, window_start) LIMIT {n:UInt64}",
        {"t": TENANT, "m": max_m.id, "n": n},
    )
    now = datetime.now(UTC)
    corr: list[Any] = []
    over: list[Any] = []
    old: list[Any] = []
    for i, (customer, window, events) in enumerate(keys):
        seq = first_seq + i
        cid = f"cor_{seq}"
        corr.append(
            (
                TENANT,
                seq,
                cid,
                f"ev{seq}",
                "",
                customer,
                window,
                "",
                "",
                {},
                0,
                0,
                Decimal(0),
                "void",
                "",
                "{}",
                now,
                1,
            )
        )
        corr.append(
            (
                TENANT,
                seq,
                cid,
                f"ev{seq}",
                count_m.id,
                customer,
                window,
                "",
                "s",
                {},
                -1,
                0,
                Decimal(0),
                "",
                "",
                "",
                now,
                1,
            )
        )
        corr.append(
            (
                TENANT,
                seq,
                cid,
                f"ev{seq}",
                max_m.id,
                customer,
                window,
                "",
                "s",
                {},
                -1,
                -1,
                Decimal(-1),
                "",
                "",
                "",
                now,
                1,
            )
        )
        over.append(
            (
                TENANT,
                max_m.id,
                customer,
                window,
                "",
                "s",
                seq,
                int(events),
                override_version(seq, int(events)),
                {},
                int(events) - 1,
                int(events) - 1,
                Decimal(1),
                Decimal(1),
                Decimal(1),
                [],
                (0, "", Decimal(0)),
                now,
            )
        )
        old.append((TENANT, count_m.id, customer, window, "", cid, {}, -1, Decimal(0)))
    if corr:
        db = store.database
        store.insert("corrections", corr, CORRECTION_COLUMNS)
        store.insert("usage_overrides", over, OVERRIDE_COLUMNS)
        store.insert(
            "usage_corrections",
            old,
            [
                "tenant_id",
                "meter_id",
                "customer",
                "window_start",
                "group_key",
                "correction_id",
                "group_values",
                "events",
                "value_sum",
            ],
        )


def correction_latency(store: Store, events: int) -> dict[str, Any]:
    """The correction use-case itself on a tenant with ``events`` events in the ledger: a void
    of a count-meter event (effect rows only) and of a max-meter event (plus the recomputation
    of its minute window from the ledger)."""
    import orjson

    from api.billing_state import build_services
    from clickhouse.repo import Repo
    from clickhouse.sink import EVENTS_COLUMNS
    from schemas.billing import CorrectionAction, CorrectionIn
    from schemas.meters import MeterSpec
    from tally.settings import Settings

    repo = Repo(store)
    tenant, _ = repo.create_tenant("ledger")
    tid = tenant.tenant_id
    for slug, etype, agg in (("n", "e_count", "count"), ("top", "e_max", "max")):
        spec = {"slug": slug, "event_type": etype, "aggregation": agg}
        if agg == "max":
            spec["value_property"] = "$.v"
        repo.create_meter(tid, MeterSpec.model_validate(spec))
    rnd = random.Random(5)
    now = datetime.now(UTC)
    minutes = 30 * 24 * 60
    cols: dict[str, list[Any]] = {c: [] for c in EVENTS_COLUMNS}
    ids: dict[str, list[str]] = {"e_count": [], "e_max": []}
    for i in range(events):
        etype = "e_count" if i % 2 else "e_max"
        eid = f"{rnd.getrandbits(64):016x}"
        if i % 1000 < 2:
            ids[etype].append(eid)
        row = (
            tid,
            eid,
            etype,
            f"c{rnd.randrange(1000):04d}",
            START + timedelta(minutes=rnd.randrange(minutes), milliseconds=i % 1000),
            orjson.dumps({"v": rnd.randint(1, 999)}).decode(),
            now,
            "tally.events",
            i % 4,
            i,
            0,
        )
        for name, value in zip(EVENTS_COLUMNS, row, strict=True):
            cols[name].append(value)
        if len(cols["tenant_id"]) >= 500_000 or i == events - 1:
            store.insert(
                "events", [cols[n] for n in EVENTS_COLUMNS], EVENTS_COLUMNS, column_oriented=True
            )
            cols = {c: [] for c in EVENTS_COLUMNS}
    store.command(f"OPTIMIZE TABLE {store.database}.events FINAL")
    svc = build_services(Settings.model_validate({"billing_tasks": False}), store, repo)
    out: dict[str, Any] = {"ledger_events": events}
    for etype in ("e_count", "e_max"):
        samples = []
        for eid in ids[etype][:20]:
            t0 = time.perf_counter()
            svc.corrections.correct(
                tid, eid, CorrectionIn(action=CorrectionAction.VOID, reason="bench")
            )
            samples.append((time.perf_counter() - t0) * 1000)
        samples.sort()
        out["void_" + ("count" if etype == "e_count" else "max") + "_meter"] = {
            "median_ms": round(statistics.median(samples), 1),
            "p95_ms": round(samples[int(len(samples) * 0.95) - 1], 1),
        }
    return out


def timed(fn: Any) -> dict[str, float]:
    fn()
    samples = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 2),
        "p95_ms": round(samples[int(len(samples) * 0.95) - 1], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="200 customers")
    ap.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "corrections_query.json")
    )
    args = ap.parse_args()
    customers = 200 if args.quick else 1000
    per = 2000
    tmp = tempfile.mkdtemp(prefix="tally-bench-corr-")
    store = Store.open(f"chdb://{tmp}", "bench")
    store.migrate()
    count_m, max_m = meter("calls", Aggregation.COUNT), meter("peak", Aggregation.MAX)
    seed_s = seed_usage(store, [count_m, max_m], customers, per)
    store.command(f"OPTIMIZE TABLE {store.database}.usage_minute FINAL")  # steady state: merged
    print(f"seeded {2 * customers * per} usage rows in {seed_s:.1f}s", flush=True)
    db = store.database
    results = []
    seq = 1
    for n in (0, 100, 1000, 10_000):
        if n:
            seed_corrections(store, count_m, max_m, n - (seq - 1), seq)
            seq = n + 1
        for m in (count_m, max_m):
            shapes = {
                "month_by_customer": UsageQuery(
                    tenant_id=TENANT, meter=m, from_=START, to=END, tz="UTC", group_by=["customer"]
                ),
                "one_customer_daily": UsageQuery(
                    tenant_id=TENANT,
                    meter=m,
                    from_=START,
                    to=END,
                    tz="UTC",
                    window=WindowSize.DAY,
                    customers=["c0007"],
                ),
            }
            for shape, q in shapes.items():
                old = old_queries(q, db)
                before = timed(lambda old=old: [store.query_rows(s, p) for s, p in old])
                after = timed(lambda q=q: run_usage(store, q))
                r = {
                    "corrections": n,
                    "meter": m.aggregation.value,
                    "query": shape,
                    "before": before,
                    "after": after,
                }
                print(json.dumps(r), flush=True)
                results.append(r)
    latency = correction_latency(store, 200_000 if args.quick else 2_000_000)
    print(json.dumps(latency), flush=True)
    store.close()
    doc = {
        "benchmark": "corrections_query",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_1m": round(os.getloadavg()[0], 1),
        },
        "usage_rows": 2 * customers * per,
        "customers": customers,
        "results": results,
        "corrections": latency,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
