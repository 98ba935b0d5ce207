"""Webhook delivery to a real local HTTP receiver: signatures verify, a 500 is retried with
backoff, every delivery id is delivered once, the delivery log is queryable; usage thresholds
fire once per period."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import orjson
import pytest

from api.billing_state import build_services
from billing.webhooks import verify
from schemas.billing import WebhookEndpointIn
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
