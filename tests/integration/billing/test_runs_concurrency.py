"""Two invoice runs at the same time (as two API replicas: separate services, separate store
clients, no shared lock) create exactly one invoice per period, and finalizing from both sides
gives gapless numbers."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from api.billing_state import build_services
from clickhouse.store import Store
from schemas.catalog import CustomerIn, SubscriptionIn
from schemas.pricing import PlanSpec
from tally.settings import Settings

from .conftest import Tenant

AS_OF = datetime(2025, 4, 1, 2, tzinfo=UTC)


def _replica(chdb_dir: Path, database: str, settings: Settings) -> Any:
    return build_services(settings, Store.open(f"chdb://{chdb_dir}", database))


def test_two_concurrent_runs_make_one_invoice_per_period(
    store: Any, tenant: Tenant, chdb_dir: Path, settings: Settings
) -> None:
    a = _replica(chdb_dir, store.database, settings)
    b = _replica(chdb_dir, store.database, settings)
    a.catalog.create_plan(
        tenant.id,
        PlanSpec.model_validate(
            {
                "code": "p",
                "name": "P",
                "currency": "USD",
                "charges": [
                    {"key": "base", "price": {"model": "flat", "amount": "10"}},
                    {
                        "key": "api",
                        "meter_slug": "api",
                        "price": {"model": "per_unit", "unit_amount": "0.01"},
                    },
                ],
            }
        ),
    )
    for i in range(40):
        a.catalog.create_customer(
            tenant.id, CustomerIn(external_id=f"c{i}", name=f"C{i}", currency="USD")
        )
        a.catalog.create_subscription(
            tenant.id,
            SubscriptionIn(
                customer_id=f"c{i}", plan_code="p", start_at=datetime(2025, 1, 1, tzinfo=UTC)
            ),
            now=datetime(2025, 1, 1, tzinfo=UTC),
        )
        tenant.usage(
            f"c{i}",
            [("api", datetime(2025, 2, 3, tzinfo=UTC) + timedelta(minutes=i), {})] * (i + 1),
        )
    outs: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def go(name: str, svc: Any) -> None:
        barrier.wait()
        outs[name] = svc.invoicing.run(tenant.id, AS_OF)

    threads = [threading.Thread(target=go, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert set(outs) == {"a", "b"}
    # Jan, Feb, Mar for 40 subscriptions: 120 periods.
    invoices = a.invoicing.list_invoices(tenant.id)
    per_period = Counter((i.subscription_id, i.period_start) for i in invoices)
    assert len(per_period) == 120 and set(per_period.values()) == {1}
    raw = store.query_rows(
        f"SELECT subscription_id, period_start, count() FROM {store.database}.invoices FINAL "
        "WHERE tenant_id = {t:String} GROUP BY subscription_id, period_start HAVING count() > 1",
        {"t": tenant.id},
    )
    assert raw == []
    created = set(outs["a"].created) | set(outs["b"].created)
    assert created == {i.id for i in invoices}
    assert len(outs["a"].created) + outs["a"].existing == 120
    assert len(outs["b"].created) + outs["b"].existing == 120
    feb = [i for i in invoices if i.period_start.month == 2]
    assert sorted(str(i.total) for i in feb)[:2] == ["10.01", "10.02"]

    # A third run creates nothing.
    again = b.invoicing.run(tenant.id, AS_OF)
    assert again.created == [] and again.existing == 120

    # Finalize every invoice from both replicas at once: numbers 1..120, each used once.
    ids = [i.id for i in invoices]
    errors: list[BaseException] = []

    def fin(svc: Any, part: list[str]) -> None:
        barrier.wait()
        for inv_id in part:
            try:
                svc.invoicing.finalize(tenant.id, inv_id)
            except Exception as exc:  # 409 "already finalized" when the other side won
                if "already finalized" not in str(exc):
                    errors.append(exc)

    threads = [
        threading.Thread(target=fin, args=(a, ids[::2] + ids[1::4])),
        threading.Thread(target=fin, args=(b, ids[1::2] + ids[::4])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    final = a.invoicing.list_invoices(tenant.id)
    numbers = sorted(int(i.number.split("-")[1]) for i in final if i.number)
    assert all(i.status.value == "finalized" for i in final)
    assert numbers == list(range(1, 121))


def test_runs_with_different_views_list_each_invoice_once(
    store: Any, tenant: Tenant, chdb_dir: Path, settings: Settings
) -> None:
    """Replica A plans April's run (Jan-Mar for every subscription) and is slow to write; replica
    B runs for March (Jan-Feb) meanwhile. Without serialization both would write Jan-Feb (their
    inserts differ, so the deduplication token does not drop either) and both would list those
    invoices in `created`. With the tenant's run lease B waits for A and creates nothing."""
    a = _replica(chdb_dir, store.database, settings)
    b = _replica(chdb_dir, store.database, settings)
    a.catalog.create_plan(
        tenant.id,
        PlanSpec.model_validate(
            {
                "code": "p",
                "name": "P",
                "currency": "USD",
                "charges": [{"key": "base", "price": {"model": "flat", "amount": "10"}}],
            }
        ),
    )
    for i in range(10):
        a.catalog.create_customer(
            tenant.id, CustomerIn(external_id=f"c{i}", name=f"C{i}", currency="USD")
        )
        a.catalog.create_subscription(
            tenant.id,
            SubscriptionIn(
                customer_id=f"c{i}", plan_code="p", start_at=datetime(2025, 1, 1, tzinfo=UTC)
            ),
            now=datetime(2025, 1, 1, tzinfo=UTC),
        )
    a_planned, b_done = threading.Event(), threading.Event()
    outs: dict[str, Any] = {}
    paused: list[bool] = []

    def slow(stage: str, done: int, total: int) -> None:
        if stage == "plan":
            a_planned.set()
        if stage == "rate" and not paused:  # A has composed its invoices, not written them
            paused.append(True)
            b_done.wait(5)  # B cannot finish while A holds the lease: A goes on after 5 s

    def run_a() -> None:
        outs["a"] = a.invoicing.run(tenant.id, AS_OF, progress=slow)

    def run_b() -> None:
        outs["b"] = b.invoicing.run(tenant.id, datetime(2025, 3, 1, 2, tzinfo=UTC))
        b_done.set()

    ta = threading.Thread(target=run_a)
    ta.start()
    assert a_planned.wait(60)
    tb = threading.Thread(target=run_b)
    tb.start()
    ta.join(120)
    tb.join(120)
    created_a, created_b = set(outs["a"].created), set(outs["b"].created)
    assert not created_a & created_b, "an invoice listed as created by two runs"
    invoices = {i.id for i in a.invoicing.list_invoices(tenant.id)}
    assert len(invoices) == 30 and created_a | created_b == invoices
    assert len(created_a) + outs["a"].existing == 30
    assert len(created_b) + outs["b"].existing == 20
