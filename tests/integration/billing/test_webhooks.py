"""Webhook delivery to a real local HTTP receiver: signatures verify, a 500 is retried with
backoff, every delivery id is delivered once, the delivery log is queryable; usage thresholds
fire once per period."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import orjson
import pytest

from api.billing_state import build_services
from billing.webhooks import verify
from schemas.billing import CreditNoteIn, VoidIn, WebhookEndpointIn
from tally.settings import Settings

from .conftest import Tenant
from .test_invoicing import PLAN, call, setup_customer

pytestmark = pytest.mark.anyio


class Receiver:
    """Answers 500 to the first attempt of every delivery id, 200 afterwards."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        self.seen: dict[str, int] = defaultdict(int)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                did = self.headers["Tally-Webhook-Id"]
                outer.seen[did] += 1
                code = 500 if outer.seen[did] == 1 else 200
                outer.requests.append(({k: v for k, v in self.headers.items()}, body, code))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def ok(self) -> list[tuple[dict[str, str], bytes, int]]:
        return [r for r in self.requests if r[2] == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(cond: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_signed_deliveries_retry_after_500_without_duplicates(
    client: httpx.AsyncClient, tenant: Tenant, store: Any, tmp_path: Any
) -> None:
    settings = Settings.model_validate(
        {
            "data_dir": tmp_path / "d",
            "billing_tasks": False,
            "invoice_run_workers": 1,
            "webhook_backoff_s": 0.05,
            "webhook_poll_interval_s": 0.05,
            "threshold_check_interval_s": 0.2,
        }
    )
    svc = build_services(settings, store)
    client._transport.app.state.billing = svc  # type: ignore[attr-defined]  (the API uses it)
    rx = Receiver()
    try:
        ep = await call(client, tenant, "POST", "/v1/webhooks/endpoints", {"url": rx.url}, 201)
        secret = ep["secret"]
        assert secret.startswith("whsec_")
        listed = (await call(client, tenant, "GET", "/v1/webhooks/endpoints"))["data"]
        assert "secret" not in listed[0] or listed[0]["secret"] is None
        await call(client, tenant, "POST", "/v1/plans", PLAN, 201)
        await setup_customer(client, tenant)
        out = await call(
            client, tenant, "POST", "/v1/invoices/run", {"as_of": "2025-03-01T01:00:00Z"}
        )
        assert len(out["created"]) == 2
        await call(client, tenant, "POST", f"/v1/invoices/{out['created'][0]}/finalize")
        await call(
            client,
            tenant,
            "POST",
            "/v1/customers/acme-1/thresholds",
            {"meter_slug": "api", "value": "5"},
            201,
        )
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        tenant.usage("acme-1", [("api", now, {})] * 6)
        svc.webhooks.start()
        # 2 created + 1 finalized + 1 threshold crossing, each first refused (500) then retried.
        wait_for(lambda: len(rx.ok()) == 4)
        time.sleep(0.6)  # more dispatch and threshold rounds: nothing else arrives
        svc.webhooks.stop()
        assert len(rx.ok()) == 4 and len(rx.requests) == 8
        ids = [h["Tally-Webhook-Id"] for h, _, _ in rx.ok()]
        assert len(set(ids)) == 4  # one successful delivery per id
        types = sorted(orjson.loads(b)["type"] for _, b, _ in rx.ok())
        assert types == [
            "invoice.created",
            "invoice.created",
            "invoice.finalized",
            "usage.threshold_crossed",
        ]
        for headers, body, _ in rx.requests:
            assert verify(
                secret, headers["Tally-Webhook-Timestamp"], body, headers["Tally-Signature"]
            )
            assert not verify(
                "whsec_wrong", headers["Tally-Webhook-Timestamp"], body, headers["Tally-Signature"]
            )
        log = (await call(client, tenant, "GET", "/v1/webhooks/deliveries"))["data"]
        assert sorted(d["status"] for d in log) == ["succeeded"] * 4
        one = await call(client, tenant, "GET", f"/v1/webhooks/deliveries/{ids[0]}")
        assert [(a["attempt"], a["status_code"]) for a in one["log"]] == [(1, 500), (2, 200)]
        assert one["attempts"] == 2
        # Emitting the same event again queues nothing (deterministic ids).
        assert svc.webhooks.check_thresholds(tenant.id) == []
    finally:
        svc.webhooks.stop()
        rx.close()


async def test_a_threshold_names_what_is_missing(client: httpx.AsyncClient, tenant: Tenant) -> None:
    """An unknown customer in the path is 404 naming ``customer_id``; an unknown meter in the
    body of an existing customer is 400 naming ``meter_slug`` (the customer is there: a 404
    would say the resource the path names is missing). Nothing is stored for either."""
    body = {"meter_slug": "api", "value": "5"}
    r = await client.post("/v1/customers/ghost/thresholds", json=body, headers=tenant.headers)
    assert r.status_code == 404, r.text
    assert r.json()["error"] == "not_found"
    assert [d["field"] for d in r.json()["details"]] == ["customer_id"]
    await call(
        client,
        tenant,
        "POST",
        "/v1/customers",
        {"external_id": "thr-1", "name": "T", "currency": "USD"},
        201,
    )
    r = await client.post(
        "/v1/customers/thr-1/thresholds",
        json={"meter_slug": "no-such-meter", "value": "5"},
        headers=tenant.headers,
    )
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["error"] == "invalid_request"
    assert err["details"] == [{"field": "meter_slug", "message": "unknown meter 'no-such-meter'"}]
    assert "no-such-meter" in err["message"]
    assert (await call(client, tenant, "GET", "/v1/customers/thr-1/thresholds"))["data"] == []
    made = await call(client, tenant, "POST", "/v1/customers/thr-1/thresholds", body, 201)
    assert made["meter_slug"] == "api" and made["customer_id"] == "thr-1"


def test_gives_up_after_max_attempts(store: Any, tenant: Tenant, tmp_path: Any) -> None:
    settings = Settings.model_validate(
        {
            "data_dir": tmp_path / "d",
            "webhook_backoff_s": 0.01,
            "webhook_max_attempts": 3,
        }
    )
    calls: list[str] = []

    def refuse(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
        calls.append(headers["Tally-Webhook-Id"])
        raise ConnectionError("refused")

    svc = build_services(settings, store)
    svc.webhooks.sender = refuse
    svc.webhooks.create_endpoint(tenant.id, WebhookEndpointIn(url="http://127.0.0.1:9/x"))
    svc.webhooks.emit(tenant.id, "invoice.created", "inv_1", {"id": "inv_1"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(calls) < 3:
        svc.webhooks.dispatch_once()
        time.sleep(0.02)
    svc.webhooks.dispatch_once()
    d = svc.webhooks.deliveries(tenant.id)[0]
    assert len(calls) == 3 and d.status.value == "failed" and "ConnectionError" in d.last_error


class Crash(BaseException):
    """Stands for kill -9: no error handling of the process runs after it."""


def _fast(tmp_path: Any, **kw: Any) -> Settings:
    return Settings.model_validate(
        {
            "data_dir": tmp_path / "d",
            "billing_tasks": False,
            "invoice_run_workers": 1,
            "webhook_backoff_s": 0.05,
            "webhook_timeout_s": 1.0,
            "webhook_lease_s": 12.0,
            **kw,
        }
    )


async def test_a_crash_between_a_change_and_its_notification_loses_nothing(
    client: httpx.AsyncClient, tenant: Tenant, store: Any, tmp_path: Any, chdb_dir: Any
) -> None:
    """Each state change crashes right after its commit point, before its notification is
    queued (and one finalization between its number claim and the invoice row). A restarted
    process's reconciliation queues exactly the lost notifications, which are delivered once."""
    from clickhouse.store import Store

    settings = _fast(tmp_path)
    svc = build_services(settings, store)
    client._transport.app.state.billing = svc  # type: ignore[attr-defined]
    rx = Receiver()
    try:
        ep = svc.webhooks.create_endpoint(tenant.id, WebhookEndpointIn(url=rx.url))
        await call(client, tenant, "POST", "/v1/plans", PLAN, 201)
        await setup_customer(client, tenant, "a")
        await setup_customer(client, tenant, "b")

        def crash(*_a: Any, **_k: Any) -> None:
            raise Crash

        svc.invoicing.notify = crash
        as_of = datetime(2025, 3, 1, 2, tzinfo=UTC)
        with pytest.raises(Crash):
            svc.invoicing.run(tenant.id, as_of)
        invs = svc.invoicing.list_invoices(tenant.id)
        assert len(invs) == 4 and svc.webhooks.deliveries(tenant.id) == []
        a_jan, a_feb, _b_jan, b_feb = sorted(invs, key=lambda i: (i.customer_id, i.period_start))
        with pytest.raises(Crash):
            svc.invoicing.finalize(tenant.id, a_feb.id)
        with pytest.raises(Crash):
            svc.invoicing.void(tenant.id, a_jan.id, VoidIn(reason="wrong"))
        with pytest.raises(Crash):
            svc.invoicing.create_credit_note(
                tenant.id, a_feb.id, CreditNoteIn(reason="goodwill", amount=Decimal("1.00"))
            )
        # a finalization that dies between its number claim (the commit point) and the row
        real_write = svc.rows.write_invoices

        def die_on_finalized_rows(tenant_id: str, rows: Any, *, create: bool = False) -> None:
            if not create and any(i.status.value == "finalized" for i in rows):
                raise Crash
            real_write(tenant_id, rows, create=create)

        svc.rows.write_invoices = die_on_finalized_rows  # type: ignore[method-assign]
        with pytest.raises(Crash):
            svc.invoicing.finalize(tenant.id, b_feb.id)
        assert svc.webhooks.deliveries(tenant.id) == []

        # A new process (its own store client) starts: its reconciliation queues what was lost.
        fresh = build_services(settings, Store.open(f"chdb://{chdb_dir}", store.database))
        queued = fresh.webhooks.reconcile_all()
        assert queued == 8
        assert fresh.webhooks.reconcile_all() == 0  # once
        expected = {("invoice.created", i.id) for i in invs} | {
            ("invoice.finalized", a_feb.id),
            ("invoice.finalized", b_feb.id),
            ("invoice.voided", a_jan.id),
        }
        deadline = time.monotonic() + 60
        while len(rx.ok()) < 8 and time.monotonic() < deadline:
            fresh.webhooks.dispatch_once()
            time.sleep(0.05)
        fresh.webhooks.stop()
        bodies = [orjson.loads(b) for _, b, _ in rx.ok()]
        got = {(b["type"], b["data"]["id"]) for b in bodies}
        notes = svc.invoicing.list_credit_notes(tenant.id)
        assert got == expected | {("credit_note.created", notes[0].id)}
        ids = [h["Tally-Webhook-Id"] for h, _, _ in rx.ok()]
        assert len(ids) == len(set(ids)) == 8
        fin = next(
            b for b in bodies if b["type"] == "invoice.finalized" and b["data"]["id"] == b_feb.id
        )
        assert fin["data"]["status"] == "finalized" and fin["data"]["number"] == "INV-000002"
        assert fresh.invoicing.get_invoice(tenant.id, b_feb.id).status.value == "finalized"
        created = next(
            b for b in bodies if b["type"] == "invoice.created" and b["data"]["id"] == a_feb.id
        )
        assert created["data"]["status"] == "draft" and created["data"]["number"] is None
        assert created["created_at"] == a_feb.created_at.isoformat()
        assert ep.id and all(h["Tally-Webhook-Id"].startswith("dlv_") for h, _, _ in rx.ok())
    finally:
        svc.webhooks.stop()
        rx.close()


def test_two_dispatchers_send_each_attempt_once(
    store: Any, tenant: Tenant, tmp_path: Any, chdb_dir: Any
) -> None:
    """Two API replicas run their dispatcher against one store: each delivery attempt is sent
    once (the first answer is a 500, so every id is sent exactly twice). When the dispatcher
    holding the lease dies without releasing it, the other takes over once the lease expired,
    and the dead one's lease can no longer send."""
    from clickhouse.store import Store

    settings = _fast(tmp_path)
    a = build_services(settings, store)
    b = build_services(settings, Store.open(f"chdb://{chdb_dir}", store.database))
    rx = Receiver()
    try:
        a.webhooks.create_endpoint(tenant.id, WebhookEndpointIn(url=rx.url))
        a.webhooks.emit_many(
            tenant.id, "invoice.created", [(f"inv_{k}", {"id": k}) for k in range(20)]
        )
        stop = threading.Event()
        sent: dict[str, int] = {"a": 0, "b": 0}

        def loop(name: str, svc: Any) -> None:
            while not stop.is_set():
                sent[name] += svc.webhooks.dispatch_once()
                time.sleep(0.02)

        threads = [threading.Thread(target=loop, args=(n, s)) for n, s in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        wait_for(lambda: len(rx.ok()) == 20, timeout=120)
        time.sleep(0.5)  # more rounds on both sides: nothing else is sent
        stop.set()
        for t in threads:
            t.join(30)
        per_id: dict[str, list[int]] = defaultdict(list)
        for h, _, code in rx.requests:
            per_id[h["Tally-Webhook-Id"]].append(code)
        assert len(per_id) == 20 and all(codes == [500, 200] for codes in per_id.values())
        assert 0 in sent.values()  # one dispatcher did all the sending

        # The holder dies (no release); the other waits for the lease to expire, then sends.
        holder, other = (a, b) if sent["a"] else (b, a)
        holder.webhooks.dispatch_once()  # renews: a fresh lease
        other.webhooks.emit_many(
            tenant.id, "invoice.voided", [(f"inv_{k}", {"id": k}) for k in range(5)]
        )
        assert holder.webhooks.lease.valid_for() > 0
        assert other.webhooks.dispatch_once() == 0  # the lease is the holder's
        before = len(rx.requests)
        deadline = time.monotonic() + 120
        while len(rx.ok()) < 25 and time.monotonic() < deadline:
            other.webhooks.dispatch_once()
            time.sleep(0.05)
        assert len(rx.ok()) == 25 and len(rx.requests) == before + 10
        assert holder.webhooks.dispatch_once() == 0  # its lease is gone
    finally:
        a.webhooks.stop()
        b.webhooks.stop()
        rx.close()
