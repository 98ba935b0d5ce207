"""The Python SDK (`tally_client`) against a running `tally run`: batching, retries through a
fault-injecting proxy (503 with Retry-After, answers lost after Tally stored the events, 502s,
the server unreachable), a full queue, typed results, and the flush at interpreter exit.
Totals are compared with a ground truth computed here."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from schemas.catalog import Customer, PlanVersion, Subscription, UpcomingInvoice
from schemas.events import IngestResult
from schemas.meters import Meter
from tally_client import (
    AsyncTally,
    BadRequestError,
    ConflictError,
    ConnectionFailedError,
    DeliveryError,
    NotFoundError,
    QueueFullError,
    RetryPolicy,
    Tally,
)
from tests.integration.e2e.harness import REPO, TallyProcess, create_tenant, start_embedded
from tests.support.faultproxy import FaultProxy

FAST = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, max_elapsed=120)


@pytest.fixture(scope="module")
def tally(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("sdk-e2e")
    proc: TallyProcess
    proc, url = start_embedded(tmp / "data", tmp / "tally.log")
    try:
        yield url
    finally:
        assert proc.terminate() == 0, proc.tail()


def window() -> tuple[datetime, datetime]:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    return now - timedelta(days=1), now + timedelta(minutes=10)


def per_customer(t: Tally, slug: str) -> dict[str, Decimal]:
    frm, to = window()
    res = t.meters.usage(slug, from_=frm, to=to, group_by=["customer"])
    return {row.customer: row.value for row in res.data if row.customer and row.value is not None}


def setup_meters(t: Tally) -> None:
    t.meters.create({"slug": "calls", "event_type": "api.call", "aggregation": "count"})
    m = t.meters.create(
        {"slug": "tokens", "event_type": "api.call", "aggregation": "sum",
         "value_property": "$.tokens"}
    )  # fmt: skip
    assert isinstance(m, Meter) and m.slug == "tokens"


def test_sync_client_batches_and_retries_to_an_exact_total(tally: str) -> None:
    key = create_tenant(tally, "sdk-sync")
    with (
        FaultProxy(tally) as proxy,
        Tally(proxy.url, key, batch_size=100, flush_interval=0.1, retry=FAST) as t,
    ):
        setup_meters(t)
        with pytest.raises(ConflictError):
            t.meters.create({"slug": "calls", "event_type": "x", "aggregation": "count"})
        proxy.add("unavailable", prefix="/v1/events", count=3, retry_after=1)
        proxy.add("lose", prefix="/v1/events", count=3)
        proxy.add("bad_gateway", prefix="/v1/events", count=2)
        calls: Counter[str] = Counter()
        tokens: Counter[str] = Counter()
        ids = []
        for i in range(2500):
            customer = f"c{i % 7}"
            ids.append(t.track("api.call", customer, {"tokens": i % 13}))
            calls[customer] += 1
            tokens[customer] += i % 13
        t.flush()
        assert t.pending == 0
        assert len(set(ids)) == 2500
        assert proxy.injected == {"unavailable": 3, "lose": 3, "bad_gateway": 2}
        # An explicit resend of the first 300 (same ids) changes nothing.
        again = t.ingest(
            [{"id": ids[i], "type": "api.call", "customer": f"c{i % 7}",
              "properties": {"tokens": i % 13}} for i in range(300)]
        )  # fmt: skip
        assert again == IngestResult(accepted=300)
        assert per_customer(t, "calls") == {c: Decimal(n) for c, n in calls.items()}
        assert per_customer(t, "tokens") == {c: Decimal(n) for c, n in tokens.items()}


def test_ingest_reports_rejected_events_and_splits_on_413(tally: str) -> None:
    key = create_tenant(tally, "sdk-ingest")
    with Tally(tally, key, retry=FAST, max_batch=1000) as t:
        setup_meters(t)
        events = [
            {"id": f"e{i}", "type": "api.call", "customer": "c1", "properties": {"tokens": 1}}
            for i in range(1500)
        ]
        events[7] = {"id": "e7", "type": "api.call"}  # no customer
        events[1200]["time"] = "not a time"
        res = t.ingest(events)
        assert res.accepted == 1498
        assert [(e.index, e.field) for e in res.rejected] == [(7, "customer"), (1200, "time")]
        with pytest.raises(ValueError, match="id"):
            t.ingest([{"type": "api.call", "customer": "c"}])
        assert per_customer(t, "calls") == {"c1": Decimal(1498)}
    # max_batch above the server's limit: the client halves on 413 until it fits.
    with Tally(tally, key, retry=FAST, max_batch=4000) as t:
        res = t.ingest(
            [{"id": f"big{i}", "type": "api.call", "customer": "c2"} for i in range(3000)]
        )
        assert res == IngestResult(accepted=3000)
        assert per_customer(t, "calls")["c2"] == Decimal(3000)


def test_full_queue_is_a_clear_error_and_nothing_queued_is_lost(tally: str) -> None:
    key = create_tenant(tally, "sdk-queue")
    with FaultProxy(tally) as proxy:
        with Tally(tally, key) as setup:
            setup_meters(setup)
        proxy.add("unavailable", prefix="/v1/events", seconds=4, retry_after=1)
        t = Tally(proxy.url, key, batch_size=50, flush_interval=0.05, max_queue_size=200,
                  retry=FAST)  # fmt: skip
        queued = 0
        with pytest.raises(QueueFullError, match="queue is full"):
            for i in range(10_000):
                t.track("api.call", "q", {"tokens": 1}, id=f"q{i}")
                queued += 1
        assert 200 <= queued < 10_000
        t.close()  # the outage ends; close flushes everything that was queued
        with Tally(tally, key) as check:
            assert per_customer(check, "calls") == {"q": Decimal(queued)}


def test_unreachable_server_gives_up_with_a_delivery_error(tally: str) -> None:
    key = create_tenant(tally, "sdk-down")
    t = Tally("http://127.0.0.1:9", key, flush_interval=0.05,
              retry=RetryPolicy(max_attempts=3, initial_backoff=0.05))  # fmt: skip
    failed: list[int] = []
    t.on_error = lambda exc, events: failed.append(len(events))
    t.track("api.call", "c", {"tokens": 1})
    with pytest.raises(DeliveryError) as info:
        t.flush()
    assert isinstance(info.value.failures[0][0], ConnectionFailedError)
    assert len(info.value.events) == 1 and failed == [1]
    with pytest.raises(ConnectionFailedError):
        t.meters.list()
    t.close()


def test_async_client_with_faults(tally: str) -> None:
    key = create_tenant(tally, "sdk-async")

    async def main(proxy_url: str) -> dict[str, Decimal]:
        async with AsyncTally(proxy_url, key, batch_size=100, flush_interval=0.1, retry=FAST) as t:
            await t.meters.create({"slug": "calls", "event_type": "api.call",
                                   "aggregation": "count"})  # fmt: skip
            for i in range(1500):
                t.track("api.call", f"a{i % 5}")
            await t.flush()
            assert t.pending == 0
            res = await t.ingest([{"id": "x", "type": "api.call", "customer": "a0"}] * 2)
            assert res.accepted == 2  # the same id twice in a request: counted once
            frm, to = window()
            usage = await t.meters.usage("calls", from_=frm, to=to, group_by=["customer"])
            with pytest.raises(NotFoundError):
                await t.meters.get("nope")
            return {r.customer: r.value for r in usage.data if r.customer and r.value}

    with FaultProxy(tally) as proxy:
        proxy.add("unavailable", prefix="/v1/events", count=2, retry_after=1)
        proxy.add("lose", prefix="/v1/events", count=2)
        got = asyncio.run(main(proxy.url))
        assert proxy.injected["lose"] == 2
    want = {f"a{k}": Decimal(300) for k in range(5)}
    want["a0"] += 1
    assert got == want


def test_catalog_and_invoice_endpoints_return_typed_models(tally: str) -> None:
    key = create_tenant(tally, "sdk-catalog")
    with Tally(tally, key, retry=FAST) as t:
        setup_meters(t)
        plan = t.plans.create(
            {
                "code": "pro",
                "name": "Pro",
                "currency": "EUR",
                "interval": "month",
                "charges": [
                    {"key": "base", "price": {"model": "flat", "amount": "10"}},
                    {"key": "tok", "meter_slug": "tokens",
                     "price": {"model": "per_unit", "unit_amount": "0.01"}},
                ],
            }
        )  # fmt: skip
        assert isinstance(plan, PlanVersion) and plan.version == 1
        assert [p.code for p in t.plans.list()] == ["pro"]
        assert t.plans.get("pro", 1).version == 1
        v2 = t.plans.publish_version("pro", {"name": "Pro 2"})
        assert v2.version == 2 and len(t.plans.versions("pro")) == 2
        cust = t.customers.create({"external_id": "acme eu:1", "name": "Acme", "currency": "EUR"})
        assert isinstance(cust, Customer)
        assert t.customers.get("acme eu:1").name == "Acme"
        assert t.customers.update("acme eu:1", {"name": "Acme EU"}).name == "Acme EU"
        assert [c.external_id for c in t.customers.list()] == ["acme eu:1"]
        sub = t.subscriptions.create({"customer_id": "acme eu:1", "plan_code": "pro"})
        assert isinstance(sub, Subscription) and sub.plan_version == 2
        assert t.subscriptions.get(sub.id).id == sub.id
        assert [s.id for s in t.subscriptions.list("acme eu:1")] == [sub.id]
        t.ingest([{"id": f"tok{i}", "type": "api.call", "customer": "acme eu:1",
                   "properties": {"tokens": 100}} for i in range(3)])  # fmt: skip
        inv = t.invoices.upcoming("acme eu:1")
        assert isinstance(inv, UpcomingInvoice)
        usage_line = next(li for li in inv.lines if li.charge_key == "tok")
        assert usage_line.quantity == Decimal(300)
        preview = t.rating.preview({"plan_code": "pro", "usage": {"tokens": "1000"}})
        assert preview.currency == "EUR"
        with pytest.raises(BadRequestError) as bad:
            t.customers.create({"external_id": "x", "name": "X", "currency": "NOPE"})
        assert bad.value.details and bad.value.details[0]["field"] == "currency"
        raw = t.request("GET", "/v1/meters")
        assert {m["slug"] for m in raw["data"]} == {"calls", "tokens"}


def test_open_client_flushes_at_interpreter_exit(tally: str, tmp_path: Path) -> None:
    key = create_tenant(tally, "sdk-exit")
    with Tally(tally, key) as t:
        setup_meters(t)
    script = tmp_path / "track_and_exit.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio
            from tally_client import AsyncTally, Tally

            t = Tally({tally!r}, {key!r}, flush_interval=60)  # never closed
            for i in range(700):
                t.track("api.call", "sync-exit", id=f"s{{i}}")

            async def main():
                a = AsyncTally({tally!r}, {key!r}, flush_interval=60)  # never closed
                for i in range(300):
                    a.track("api.call", "async-exit", id=f"a{{i}}")

            asyncio.run(main())
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "was not closed" in out.stderr  # the async client says what it did
    with Tally(tally, key) as t:
        assert per_customer(t, "calls") == {
            "sync-exit": Decimal(700),
            "async-exit": Decimal(300),
        }


def test_sdk_doc_examples_run(tally: str) -> None:
    """Every ```python block of docs/sdk.md runs as written, in order, against the server."""
    import os
    import re

    key = create_tenant(tally, "sdk-docs")
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "docs" / "sdk.md").read_text(),
                        flags=re.S | re.M)  # fmt: skip
    assert len(blocks) >= 6
    outputs = []
    for block in blocks:
        out = subprocess.run(
            [sys.executable, "-c", block],
            cwd=REPO,
            env={**os.environ, "URL": tally, "KEY": key},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, block + out.stderr
        outputs.append(out.stdout)
    assert "cust-1 {'model': 'small'} 400" in outputs[0]
    assert outputs[1].split() == ["1", "1", "customer", "customer", "is", "required"]
    assert "404 not_found" in outputs[3]
    assert outputs[5].startswith("active ")
    with Tally(tally, key) as t:
        frm, to = window()
        total = t.meters.usage("tokens", from_=frm, to=to).data[0].value
    assert total == Decimal(400 + 50 + 1000 + 3)  # the examples tracked these tokens
