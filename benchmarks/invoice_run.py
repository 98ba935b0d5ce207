"""Invoice-run benchmark: N customers x 5 metered charges (+ a fixed fee) on embedded chDB.

History is written straight into the store (customers, subscriptions and minute usage rows in
bulk inserts) so the benchmark measures the run, not the setup. The run is timed end to end
(``billing.invoices.Invoicing.run``: plan the due periods, read the usage set-based, rate in
the worker pool, write the drafts, read back ownership) and then a second time (idempotent:
nothing to create) and once more with auto-finalize off/on is not mixed in.

    .venv/bin/python benchmarks/invoice_run.py            # 1k and 10k customers
    .venv/bin/python benchmarks/invoice_run.py --quick    # 1k only

Writes benchmarks/results/invoice_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from billing.catalog import Catalog  # noqa: E402
from billing.invoices import Invoicing, InvoicingConfig  # noqa: E402
from billing.ports import open_billing_store  # noqa: E402
from clickhouse.repo import Repo  # noqa: E402
from clickhouse.rollup import day_rows_sql  # noqa: E402
from clickhouse.sink import USAGE_COLUMNS  # noqa: E402
from clickhouse.store import Store  # noqa: E402
from rating.subscriptions import new_subscription  # noqa: E402
from schemas.catalog import Customer, SubscriptionIn  # noqa: E402
from schemas.meters import MeterSpec  # noqa: E402
from schemas.pricing import PlanSpec  # noqa: E402

METERS = 5
MINUTES = 4  # usage rows per customer and meter in the period
PERIOD_START = datetime(2025, 5, 1, tzinfo=UTC)
AS_OF = datetime(2025, 6, 1, 1, 0, tzinfo=UTC)


def plan_spec() -> PlanSpec:
    charges: list[dict] = [{"key": "base", "price": {"model": "flat", "amount": "49.00"}}]
    for i in range(METERS):
        if i % 2 == 0:
            price = {
                "model": "graduated",
                "tiers": [
                    {"up_to": "1000", "unit_amount": "0"},
                    {"up_to": "100000", "unit_amount": "0.002"},
                    {"up_to": None, "unit_amount": "0.001"},
                ],
            }
        else:
            price = {"model": "per_unit", "unit_amount": "0.0125"}
        charges.append({"key": f"m{i}", "meter_slug": f"m{i}", "price": price})
    return PlanSpec.model_validate(
        {"code": "bench", "name": "Bench", "currency": "USD", "charges": charges}
    )


def seed(store: Store, customers: int) -> tuple[str, float]:
    t0 = time.perf_counter()
    repo = Repo(store)
    tenant, _ = repo.create_tenant("bench")
    tid = tenant.tenant_id
    meters = [
        repo.create_meter(
            tid,
            MeterSpec.model_validate(
                {
                    "slug": f"m{i}",
                    "event_type": f"e{i}",
                    "aggregation": "sum",
                    "value_property": "$.v",
                }
            ),
        )
        for i in range(METERS)
    ]
    rows = open_billing_store(store, repo)
    plan = Catalog(rows).create_plan(tid, plan_spec(), now=PERIOD_START - timedelta(days=40))
    created = PERIOD_START - timedelta(days=30)
    cust_rows, sub_rows = [], []
    template = None
    for n in range(customers):
        ext = f"cust-{n:06d}"
        c = Customer(
            external_id=ext,
            name=f"Customer {n}",
            currency="USD",
            tax_rates={"VAT": Decimal("20")},
            created_at=created,
            updated_at=created,
        )
        cust_rows.append((tid, ext, c.name, "USD", c.model_dump_json(), created, created, n + 1))
        if template is None:
            template = new_subscription(
                "sub_template",
                SubscriptionIn(customer_id=ext, plan_code="bench", start_at=PERIOD_START),
                c,
                plan,
                created,
            )
        sub = template.model_copy(update={"id": f"sub_{n:06d}", "customer_id": ext})
        sub_rows.append(
            (
                tid,
                sub.id,
                ext,
                sub.status.value,
                "bench",
                1,
                sub.model_dump_json(),
                created,
                created,
                n + 1,
            )
        )
    store.insert(
        "customers",
        cust_rows,
        [
            "tenant_id",
            "external_id",
            "name",
            "currency",
            "doc",
            "created_at",
            "updated_at",
            "version",
        ],
    )
    store.insert(
        "subscriptions",
        sub_rows,
        [
            "tenant_id",
            "subscription_id",
            "customer_id",
            "status",
            "plan_code",
            "plan_version",
            "doc",
            "created_at",
            "updated_at",
            "version",
        ],
    )
    usage: list[Any] = []
    for n in range(customers):
        ext = f"cust-{n:06d}"
        for m in meters:
            for k in range(MINUTES):
                v = Decimal((n * 7919 + k * 104729) % 50000) / 10
                usage.append(
                    (
                        tid,
                        m.id,
                        ext,
                        PERIOD_START + timedelta(days=k * 7, minutes=n % 600),
                        "",
                        "s",
                        {},
                        10,
                        10,
                        v,
                        v,
                        v,
                        [],
                        (0, "", Decimal(0)),
                        0,
                    )
                )
    for i in range(0, len(usage), 200_000):
        store.insert("usage_minute", usage[i : i + 200_000], USAGE_COLUMNS)
    store.command(day_rows_sql(store.database))  # their day rows, as the worker writes them
    return tid, time.perf_counter() - t0


def run_once(customers: int, workers: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="tally-bench-inv-")
    store = Store.open(f"chdb://{tmp}", "bench")
    store.migrate()
    tid, seed_s = seed(store, customers)
    rows = open_billing_store(store)
    inv = Invoicing(rows, Catalog(rows), InvoicingConfig(workers=workers))
    stages: dict[str, float] = {}
    last: list[Any] = [time.perf_counter(), ""]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if stage != last[1]:
            if last[1]:
                stages[last[1]] = stages.get(last[1], 0) + now - last[0]
            last[0], last[1] = now, stage

    t0 = time.perf_counter()
    out = inv.run(tid, AS_OF, actor="bench", progress=progress)
    run_s = time.perf_counter() - t0
    progress("done", 0, 0)
    t1 = time.perf_counter()
    again = inv.run(tid, AS_OF, actor="bench")
    rerun_s = time.perf_counter() - t1
    assert len(out.created) == customers, (len(out.created), customers)
    assert again.created == [] and again.existing == customers
    sample = rows.invoices(tid, ids=[out.created[0]])[0]
    store.close()
    return {
        "customers": customers,
        "metered_charges": METERS,
        "usage_rows": customers * METERS * MINUTES,
        "workers": workers,
        "seed_s": round(seed_s, 2),
        "run_s": round(run_s, 2),
        "invoices_per_s": round(customers / run_s, 1),
        "rerun_s": round(rerun_s, 2),
        "stages_s": {k: round(v, 2) for k, v in stages.items()},
        "sample_invoice_total": str(sample.total),
        "lines_per_invoice": len(sample.lines),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1k customers only")
    ap.add_argument("--workers", type=int, default=0, help="rating processes (0 = one per core)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "invoice_run.json"))
    args = ap.parse_args()
    sizes = [1000] if args.quick else [1000, 10_000]
    results = []
    for n in sizes:
        r = run_once(n, args.workers)
        print(json.dumps(r), flush=True)
        results.append(r)
    doc = {
        "benchmark": "invoice_run",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_1m_at_end": round(os.getloadavg()[0], 1),
        },
        "goal": "10k customers x 5 metered charges <= 60 s",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
