"""Webhooks: endpoints, signed deliveries with retries, the delivery log, usage thresholds.

- **Events** (``invoice.created``, ``invoice.finalized``, ``invoice.voided``,
  ``credit_note.created``, ``usage.threshold_crossed``) get a deterministic id per (tenant,
  type, object); each subscribed endpoint gets one delivery, id deterministic per (endpoint,
  event), written to the outbox (``webhook_deliveries``) before anything is sent.
- **Signature**: ``Tally-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`` with
  ``Tally-Webhook-Timestamp: <unix seconds>`` and ``Tally-Webhook-Id: <delivery id>`` (the same on
  every retry: receivers dedupe on it).
- **Secrets are not stored.** An endpoint's secret is ``HMAC-SHA256(master key, tenant | endpoint
  | secret version)``; the master key is a server setting (``TALLY_WEBHOOK_MASTER_KEY``) or, in
  embedded mode, a random key in ``<data_dir>/webhook.key`` (mode 0600). A database dump alone
  reveals no secret; rotating an endpoint's secret bumps its version.
- **Retries**: any answer but 2xx, or no answer, is retried with exponential backoff
  (``webhook_backoff_s`` doubling, capped) up to ``webhook_max_attempts``; every attempt is
  logged (``webhook_attempts``) and queryable.
- **Thresholds** are evaluated here, in the API process (``check_thresholds``, every
  ``threshold_check_interval_s``), from the same usage queries as invoices: the stream worker
  stays a pure, fast aggregation loop.
- **One dispatcher** among the API replicas: the background task sends, reconciles and checks
  thresholds only while it holds the ``webhook-dispatcher`` lease (``billing.lease``: acquired
  with the insert-deduplication CAS, renewed every ``webhook_lease_s / 4``), and starts an
  attempt only while the lease covers the attempt's timeout plus its bookkeeping. So an attempt
  is not sent twice under the same delivery id by two replicas (bound: docs/invoicing.md).
- **Nothing lost on a crash**: notifications are queued after the change they announce is
  committed; a crash (or a store error) in between is repaired by the reconciliation
  (``reconcile``, every ``webhook_reconcile_interval_s``): every committed change of the
  registered sources (``NotificationSource``: invoices and credit notes) since the last pass
  whose deliveries are missing gets them, with the same deterministic ids and payload.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import orjson

from billing.lease import Lease
from billing.ports import BillingStore
from billing.usage import fetch_usage
from rating.invoice import UsageKey, floor_minute
from rating.periods import Period, period_containing
from rating.subscriptions import advance, current_period
from schemas.billing import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    Threshold,
    ThresholdIn,
    WebhookEndpoint,
    WebhookEndpointIn,
)
from schemas.catalog import SubscriptionStatus
from schemas.timeutil import utc_now
from tally.errors import Conflict, NotFound, ValidationError, detail

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Tally-Signature"
TIMESTAMP_HEADER = "Tally-Webhook-Timestamp"
ID_HEADER = "Tally-Webhook-Id"
EVENT_HEADER = "Tally-Event-Type"

Sender = Callable[[str, bytes, dict[str, str], float], int]  # url, body, headers, timeout -> status
DISPATCHER_LEASE = "webhook-dispatcher"
ATTEMPT_BOOKKEEPING_S = 5.0  # store writes after an attempt, within the lease
RECONCILE_OVERLAP = timedelta(minutes=10)  # each pass looks this far before the previous one


class NotificationSource(Protocol):
    """Where the reconciliation learns which notifications committed changes imply
    (``billing.invoices.Invoicing``)."""

    def notification_events(
        self, tenant_id: str, since: datetime
    ) -> list[tuple[str, str, datetime]]: ...

    def notification_data(
        self, tenant_id: str, wanted: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, Any]]: ...


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``v1=`` + hex HMAC-SHA256 of ``"<timestamp>." + body`` with the endpoint's secret."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    tolerance_s: int = 300,
    now: float | None = None,
) -> bool:
    """How a receiver checks a delivery (constant-time compare, timestamp within tolerance)."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def _httpx_send(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    import httpx

    return httpx.post(url, content=body, headers=headers, timeout=timeout).status_code


def _hash(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def load_master_key(settings: Any) -> bytes | None:
    """The webhook master key: the setting, else (embedded mode) ``<data_dir>/webhook.key``,
    created on first use with mode 0600. None in scale-out mode without the setting."""
    if settings.webhook_master_key:
        return str(settings.webhook_master_key).encode()
    if not getattr(settings, "embedded", True) and settings.clickhouse_url:
        return None
    path = Path(settings.data_dir) / "webhook.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key


class Webhooks:
    def __init__(
        self,
        rows: BillingStore,
        settings: Any,
        sender: Sender | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.rows = rows
        self.settings = settings
        self.sender = sender or _httpx_send
        self.clock = clock
        self._master: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_threshold_check = 0.0
        self.lease = Lease(rows, "", DISPATCHER_LEASE, float(settings.webhook_lease_s))
        self.sources: list[NotificationSource] = []
        self._reconciled_at: datetime | None = None
        self._last_reconcile = float("-inf")

    # --- secrets ------------------------------------------------------------------------------

    def _key(self) -> bytes:
        if self._master is None:
            self._master = load_master_key(self.settings)
        if self._master is None:
            raise Conflict(
                "webhooks need TALLY_WEBHOOK_MASTER_KEY (the same on every API replica)",
                details=[{"field": "webhook_master_key", "message": "not configured"}],
            )
        return self._master

    def secret(self, tenant_id: str, endpoint_id: str, version: int) -> str:
        mac = hmac.new(
            self._key(), f"{tenant_id}\0{endpoint_id}\0{version}".encode(), hashlib.sha256
        )
        return "whsec_" + mac.hexdigest()

    # --- endpoints ----------------------------------------------------------------------------

    def create_endpoint(self, tenant_id: str, req: WebhookEndpointIn) -> WebhookEndpoint:
        self._key()
        ep = WebhookEndpoint(
            id="we_" + uuid.uuid4().hex[:20],
            url=req.url,
            events=req.events,
            description=req.description,
            created_at=self.clock(),
        )
        self.rows.write_endpoint(tenant_id, ep, 1)
        return ep.model_copy(update={"secret": self.secret(tenant_id, ep.id, 1)})

    def _endpoint(self, tenant_id: str, endpoint_id: str) -> tuple[WebhookEndpoint, int]:
        for ep, version in self.rows.endpoints(tenant_id):
            if ep.id == endpoint_id:
                return ep, version
        raise NotFound(
            f"webhook endpoint {endpoint_id!r} not found",
            details=[{"field": "endpoint_id", "message": "unknown endpoint"}],
        )

    def list_endpoints(self, tenant_id: str) -> list[WebhookEndpoint]:
        return [ep for ep, _ in self.rows.endpoints(tenant_id) if not ep.disabled]

    def disable_endpoint(self, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
        ep, version = self._endpoint(tenant_id, endpoint_id)
        gone = ep.model_copy(update={"disabled": True})
        self.rows.write_endpoint(tenant_id, gone, version)
        return gone

    def rotate_secret(self, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
        ep, version = self._endpoint(tenant_id, endpoint_id)
        self.rows.write_endpoint(tenant_id, ep, version + 1)
        return ep.model_copy(update={"secret": self.secret(tenant_id, ep.id, version + 1)})

    # --- events -------------------------------------------------------------------------------

    def emit(
        self,
        tenant_id: str,
        event_type: str,
        object_id: str,
        data: dict[str, Any],
        at: datetime | None = None,
    ) -> list[str]:
        """Queue ``event_type`` about ``object_id`` for every subscribed endpoint."""
        return self.emit_many(tenant_id, event_type, [(object_id, data, at or self.clock())])

    def event_id(self, tenant_id: str, event_type: str, object_id: str) -> str:
        return "evt_" + _hash(tenant_id, event_type, object_id)

    def delivery_id(self, endpoint_id: str, event_id: str) -> str:
        return "dlv_" + _hash(endpoint_id, event_id)

    def _subscribed(
        self, tenant_id: str, event_type: str, at: datetime, endpoints: list[WebhookEndpoint]
    ) -> list[WebhookEndpoint]:
        """Endpoints that get ``event_type`` happening at ``at``: enabled, subscribed, and
        created by then (a new endpoint does not receive older events)."""
        return [
            ep
            for ep in endpoints
            if not ep.disabled and event_type in ep.events and ep.created_at <= at
        ]

    def emit_many(
        self,
        tenant_id: str,
        event_type: str,
        items: Sequence[tuple[str, dict[str, Any], datetime] | tuple[str, dict[str, Any]]],
    ) -> list[str]:
        """Queue one event per ``(object id, data, when it happened)`` for every subscribed
        endpoint (once: event and delivery ids are deterministic and existing deliveries are
        kept; the payload depends only on the event, so a reconciliation writes the same)."""
        endpoints = [ep for ep, _ in self.rows.endpoints(tenant_id)]
        if not endpoints or not items:
            return []
        now = self.clock()
        events = []
        for item in items:
            oid, data = item[0], item[1]
            at = item[2] if len(item) > 2 else now
            events.append((self.event_id(tenant_id, event_type, oid), data, at))
        have: set[str] = set()
        for i in range(0, len(events), 5000):
            ids = [e for e, _, _ in events[i : i + 5000]]
            have |= {d.id for d in self.rows.deliveries(tenant_id, event_ids=ids, limit=1 << 30)}
        new = []
        for event_id, data, at in events:
            payload = {
                "id": event_id,
                "type": event_type,
                "created_at": at.isoformat(),
                "data": data,
            }
            for ep in self._subscribed(tenant_id, event_type, at, endpoints):
                did = self.delivery_id(ep.id, event_id)
                if did in have:
                    continue
                new.append(
                    Delivery(
                        id=did,
                        endpoint_id=ep.id,
                        event_id=event_id,
                        event_type=event_type,
                        status=DeliveryStatus.PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        created_at=now,
                        updated_at=now,
                        payload=payload,
                    )
                )
        self.rows.write_deliveries(tenant_id, new, create=True)
        return [d.id for d in new]

    def reconcile(self, tenant_id: str, since: datetime) -> list[str]:
        """Queue the deliveries that committed changes since ``since`` imply and that are
        missing (a crash, or a store error, between a change and its notification)."""
        endpoints = [ep for ep, _ in self.rows.endpoints(tenant_id) if not ep.disabled]
        if not endpoints or not self.sources:
            return []
        queued: list[str] = []
        for source in self.sources:
            events = source.notification_events(tenant_id, since)
            expected: dict[str, tuple[str, str, datetime]] = {}
            for event_type, oid, at in events:
                event_id = self.event_id(tenant_id, event_type, oid)
                for ep in self._subscribed(tenant_id, event_type, at, endpoints):
                    expected[self.delivery_id(ep.id, event_id)] = (event_type, oid, at)
            if not expected:
                continue
            have: set[str] = set()
            ids = sorted(expected)
            for i in range(0, len(ids), 5000):
                found = self.rows.deliveries(tenant_id, ids=ids[i : i + 5000], limit=1 << 30)
                have |= {d.id for d in found}
            missing = {expected[d] for d in ids if d not in have}
            if not missing:
                continue
            data = source.notification_data(tenant_id, [(t, oid) for t, oid, _ in missing])
            by_type: dict[str, list[tuple[str, dict[str, Any], datetime]]] = defaultdict(list)
            for t, oid, at in sorted(missing):
                if (t, oid) in data:
                    by_type[t].append((oid, data[(t, oid)], at))
            for t, items in sorted(by_type.items()):
                queued += self.emit_many(tenant_id, t, items)
            log.info(
                "tenant %s: reconciliation queued %d lost notification(s)", tenant_id, len(queued)
            )
        return queued

    def reconcile_all(self) -> int:
        """One reconciliation pass over every tenant with endpoints: the changes since the
        previous pass (minus an overlap), or since ``webhook_reconcile_lookback`` after a start."""
        started = self.clock()
        since = (
            self._reconciled_at - RECONCILE_OVERLAP
            if self._reconciled_at is not None
            else started - self.settings.webhook_reconcile_lookback
        )
        n = 0
        for tenant_id in self.rows.endpoint_tenants():
            n += len(self.reconcile(tenant_id, since))
        self._reconciled_at = started
        return n

    def deliveries(self, tenant_id: str, endpoint_id: str | None = None) -> list[Delivery]:
        return self.rows.deliveries(tenant_id, endpoint_id=endpoint_id)

    def delivery(self, tenant_id: str, delivery_id: str) -> Delivery:
        found = self.rows.deliveries(tenant_id, ids=[delivery_id])
        if not found:
            raise NotFound(
                f"delivery {delivery_id!r} not found",
                details=[{"field": "id", "message": "unknown delivery"}],
            )
        return found[0].model_copy(update={"log": self.rows.attempts(tenant_id, delivery_id)})

    # --- dispatch -----------------------------------------------------------------------------

    def backoff(self, attempts: int) -> timedelta:
        s = self.settings.webhook_backoff_s * (2 ** max(0, attempts - 1))
        return timedelta(seconds=min(s, self.settings.webhook_backoff_max_s))

    def dispatch_once(self, limit: int = 100) -> int:
        """Send every due delivery once, if this process is the dispatcher (holds the lease);
        returns how many were attempted."""
        if not self.lease.hold():
            return 0
        now = self.clock()
        due = self.rows.due_deliveries(now, limit)
        endpoints: dict[str, dict[str, tuple[WebhookEndpoint, int]]] = {}
        need = float(self.settings.webhook_timeout_s) + ATTEMPT_BOOKKEEPING_S
        attempted = 0
        for tenant_id, d in due:
            # Start an attempt only while the lease outlives it (its timeout and bookkeeping):
            # a successor dispatcher reads the delivery's state after this one is done with it.
            if self.lease.valid_for() < need and not (
                self.lease.hold() and self.lease.valid_for() >= need
            ):
                log.warning("webhook dispatcher lost its lease; stopping this round")
                break
            if tenant_id not in endpoints:
                endpoints[tenant_id] = {ep.id: (ep, v) for ep, v in self.rows.endpoints(tenant_id)}
            self._attempt(tenant_id, d, endpoints[tenant_id].get(d.endpoint_id))
            attempted += 1
        return attempted

    def _attempt(
        self, tenant_id: str, d: Delivery, endpoint: tuple[WebhookEndpoint, int] | None
    ) -> Delivery:
        started = time.monotonic()
        now = self.clock()
        attempt = d.attempts + 1
        code: int | None = None
        error = ""
        if endpoint is None or endpoint[0].disabled:
            error = "endpoint deleted or disabled"
            attempt = max(attempt, self.settings.webhook_max_attempts)
        else:
            ep, version = endpoint
            body = orjson.dumps(d.payload)
            ts = int(now.timestamp())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "Tally-Webhooks/1",
                ID_HEADER: d.id,
                EVENT_HEADER: d.event_type,
                TIMESTAMP_HEADER: str(ts),
                SIGNATURE_HEADER: sign(self.secret(tenant_id, ep.id, version), ts, body),
            }
            try:
                code = self.sender(ep.url, body, headers, self.settings.webhook_timeout_s)
                if not 200 <= code < 300:
                    error = f"HTTP {code}"
            except Exception as exc:  # any transport failure is a failed attempt, retried
                error = f"{type(exc).__name__}: {exc}"[:500]
        ms = int((time.monotonic() - started) * 1000)
        ok = code is not None and 200 <= code < 300
        if ok:
            status, nxt = DeliveryStatus.SUCCEEDED, None
        elif attempt >= self.settings.webhook_max_attempts:
            status, nxt = DeliveryStatus.FAILED, None
        else:
            status, nxt = DeliveryStatus.PENDING, now + self.backoff(attempt)
        self.rows.append_attempt(
            tenant_id,
            d.id,
            DeliveryAttempt(attempt=attempt, at=now, status_code=code, error=error, duration_ms=ms),
        )
        updated = d.model_copy(
            update={
                "status": status,
                "attempts": attempt,
                "next_attempt_at": nxt,
                "last_status_code": code,
                "last_error": error,
                "updated_at": now,
            }
        )
        self.rows.write_deliveries(tenant_id, [updated])
        if not ok:
            log.info(
                "webhook %s to endpoint %s: attempt %d failed (%s)",
                d.id,
                d.endpoint_id,
                attempt,
                error,
            )
        return updated

    # --- thresholds ---------------------------------------------------------------------------

    def _customer(self, tenant_id: str, customer_id: str) -> None:
        if not self.rows.customers(tenant_id, customer_id):
            raise NotFound(
                f"customer {customer_id!r} not found",
                details=[{"field": "customer_id", "message": "unknown customer"}],
            )

    def add_threshold(self, tenant_id: str, customer_id: str, req: ThresholdIn) -> Threshold:
        """404 when the customer in the path is unknown; 400 naming ``meter_slug`` when the
        body names a meter the tenant does not have (as a plan's metered charge does): the
        resource the path names exists, the request's content is what is wrong."""
        self._customer(tenant_id, customer_id)
        try:
            self.rows.get_meter(tenant_id, req.meter_slug)
        except NotFound:
            raise ValidationError(
                f"meter_slug: unknown meter {req.meter_slug!r}",
                details=[detail("meter_slug", f"unknown meter {req.meter_slug!r}")],
            ) from None
        t = Threshold(
            **req.model_dump(),
            id="thr_" + uuid.uuid4().hex[:20],
            customer_id=customer_id,
            created_at=self.clock(),
        )
        self.rows.write_threshold(tenant_id, t)
        return t

    def list_thresholds(self, tenant_id: str, customer_id: str) -> list[Threshold]:
        """The customer's thresholds (404 for a customer the tenant does not have)."""
        self._customer(tenant_id, customer_id)
        return self.rows.thresholds(tenant_id, customer_id)

    def delete_threshold(self, tenant_id: str, customer_id: str, threshold_id: str) -> Threshold:
        for t in self.rows.thresholds(tenant_id, customer_id):
            if t.id == threshold_id:
                gone = t.model_copy(update={"deleted": True})
                self.rows.write_threshold(tenant_id, gone)
                return gone
        raise NotFound(
            f"threshold {threshold_id!r} not found",
            details=[{"field": "threshold_id", "message": "unknown threshold"}],
        )

    def _period(self, tenant_id: str, customer_id: str, now: datetime) -> Period:
        subs = [
            advance(s, now) for s in self.rows.subscriptions(tenant_id, customer_id=customer_id)
        ]
        live = [s for s in subs if s.status is not SubscriptionStatus.CANCELED]
        if live:
            return current_period(live[-1], now)
        return period_containing(None, "month", now, "UTC", "calendar")

    def check_thresholds(self, tenant_id: str) -> list[str]:
        """Emit ``usage.threshold_crossed`` for every threshold whose customer's usage in the
        current billing period reached it (once per threshold and period). Set-based: one usage
        query per (meter, period) for all customers."""
        now = self.clock()
        thresholds = self.rows.thresholds(tenant_id)
        if not thresholds:
            return []
        periods: dict[str, Period] = {}
        needs: dict[str, set[UsageKey]] = defaultdict(set)
        for t in thresholds:
            if t.customer_id not in periods:
                periods[t.customer_id] = self._period(tenant_id, t.customer_id, now)
            p = periods[t.customer_id]
            needs[t.customer_id].add(
                UsageKey(t.meter_slug, None, floor_minute(p.start), floor_minute(p.end))
            )
        usage = fetch_usage(self.rows, tenant_id, needs)
        emitted = []
        for t in thresholds:
            p = periods[t.customer_id]
            key = UsageKey(t.meter_slug, None, floor_minute(p.start), floor_minute(p.end))
            value = sum((a.quantity for a in usage[t.customer_id].get(key, [])), Decimal(0))
            if value >= t.value:
                data = {
                    "threshold_id": t.id,
                    "customer_id": t.customer_id,
                    "meter_slug": t.meter_slug,
                    "threshold": str(t.value),
                    "value": str(value),
                    "period_start": p.start.isoformat(),
                    "period_end": p.end.isoformat(),
                }
                emitted += self.emit(
                    tenant_id, "usage.threshold_crossed", f"{t.id}@{p.start.isoformat()}", data
                )
        return emitted

    # --- the background task ------------------------------------------------------------------

    def tick(self) -> None:
        """One round of the background task, on the dispatcher only (the lease holder): due
        deliveries, the reconciliation and thresholds when due."""
        if not self.lease.hold():
            return
        self.dispatch_once()
        if time.monotonic() - self._last_reconcile >= self.settings.webhook_reconcile_interval_s:
            self._last_reconcile = time.monotonic()
            self.reconcile_all()
        if (
            time.monotonic() - self._last_threshold_check
            >= self.settings.threshold_check_interval_s
        ):
            self._last_threshold_check = time.monotonic()
            for tenant_id in self.rows.threshold_tenants():
                self.check_thresholds(tenant_id)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.tick()
                except Exception:  # keep the task alive; the store may be briefly unavailable
                    log.exception("webhook/threshold task failed; retrying")
                self._stop.wait(self.settings.webhook_poll_interval_s)

        self._thread = threading.Thread(target=loop, name="tally-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.lease.release()  # another replica takes over at once
