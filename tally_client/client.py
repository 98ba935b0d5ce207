"""The synchronous client: ``Tally``.

``track()`` queues an event (its id and time fixed at once) and returns; a background thread
sends the queue in batches of ``batch_size`` or every ``flush_interval`` seconds, retrying with
the same ids until the server has it (see ``RetryPolicy``). ``ingest()`` sends now and returns
the server's answer. Everything else (meters, usage, plans, customers, subscriptions, invoices,
rating) is a plain request that returns a pydantic model from ``schemas``.

Use it as a context manager, or call ``close()``; at interpreter exit an open client flushes
what it still holds.
"""

from __future__ import annotations

import atexit
import builtins
import functools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from schemas.catalog import (
    Customer,
    CustomerIn,
    CustomerPatch,
    PlanDraft,
    PlanVersion,
    PreviewIn,
    PreviewOut,
    Subscription,
    SubscriptionIn,
    UpcomingInvoice,
)
from schemas.events import IngestResult
from schemas.meters import Meter, MeterSpec
from schemas.pricing import PlanSpec
from schemas.segment import SegmentConfig, SegmentConfigIn, WebhookSecretIn, WebhookSecretOut
from schemas.usage import UsageResult
from tally_client import _calls as calls
from tally_client._core import (
    MAX_BATCH,
    RETRYABLE_STATUS,
    USER_AGENT,
    Call,
    RetryPolicy,
    answer_error,
    as_event,
    build_event,
    chunks,
    decode,
    dumps,
    ingest_call,
    merge_results,
    raw,
    rejected_error,
    split_on_413,
)
from tally_client.errors import (
    ApiError,
    ClientClosedError,
    ConnectionFailedError,
    DeliveryError,
    QueueFullError,
    TallyClientError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
ErrorHandler = Callable[[Exception, list[dict[str, Any]]], None]
Body = Mapping[str, Any]


class Transport:
    """Sends ``Call``s with retries over one ``httpx.Client``."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float,
        retry: RetryPolicy,
        http: httpx.Client | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base = url.rstrip("/")
        self.retry = retry
        self._own = http is None
        self.http = http or httpx.Client(timeout=timeout)
        self.headers = {
            "Authorization": f"Bearer {api_key}",
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            **(headers or {}),
        }
        self._stop = threading.Event()
        self.attempts = 0  # requests sent, retries included (for tests and diagnostics)

    def call(self, c: Call[T]) -> T:
        content = dumps(c.body) if c.body is not None else None
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            self.attempts += 1
            err: TallyClientError
            try:
                resp = self.http.request(
                    c.method,
                    self.base + c.path,
                    params=tuple(c.params) or None,
                    content=content,
                    headers=self.headers,
                )
            except httpx.TransportError as exc:
                sure_not_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                retryable = c.idempotent or sure_not_sent
                err = ConnectionFailedError(f"{c.method} {c.path}: {type(exc).__name__}: {exc}")
                retry_after = None
            else:
                data = decode(resp.status_code, resp.content, resp.headers)
                if resp.status_code < 400:
                    return c.parse(data)
                if c.recover is not None:
                    recovered = c.recover(resp.status_code, data)
                    if recovered is not None:
                        return recovered
                status = resp.status_code
                api_err = answer_error(status, data, resp.headers, resp.text)
                err = api_err
                retryable = status in RETRYABLE_STATUS and (c.idempotent or status == 429)
                retry_after = api_err.retry_after
            if not retryable:
                raise err
            wait = self.retry.wait(attempt, retry_after)
            if self.retry.gives_up(attempt, started, wait):
                raise err
            log.debug("retrying %s %s in %.2fs after: %s", c.method, c.path, wait, err)
            if self._stop.wait(wait):
                raise ClientClosedError("the client was closed while retrying") from err

    def ingest(self, events: list[dict[str, Any]], wait: str | None, batch: int) -> IngestResult:
        """Send events in chunks of ``batch``; a 413 splits a chunk in two and tries again."""
        parts: list[tuple[int, IngestResult]] = []
        for offset, chunk in chunks(events, batch):
            parts.append((offset, self._ingest_chunk(list(chunk), wait)))
        return merge_results(parts)

    def _ingest_chunk(self, events: list[dict[str, Any]], wait: str | None) -> IngestResult:
        try:
            return self.call(ingest_call(events, wait))
        except ApiError as exc:
            if not split_on_413(exc, len(events)):
                raise
            half = len(events) // 2
            return merge_results(
                [
                    (0, self._ingest_chunk(events[:half], wait)),
                    (half, self._ingest_chunk(events[half:], wait)),
                ]
            )

    def close(self) -> None:
        self._stop.set()
        if self._own:
            self.http.close()


class Batcher:
    """The bounded queue of tracked events and the thread that sends it in batches."""

    def __init__(
        self,
        send: Callable[[list[dict[str, Any]]], None],
        *,
        batch_size: int,
        flush_interval: float,
        max_queue_size: int,
        queue_timeout: float | None,
    ) -> None:
        self._send = send
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue_size = max_queue_size
        self.queue_timeout = queue_timeout
        self._items: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._flush_waiters = 0
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._items) + self._in_flight

    def put(self, event: dict[str, Any]) -> None:
        with self._cond:
            if self._closing:
                raise ClientClosedError("the client is closed; create a new one")
            if len(self._items) >= self.max_queue_size:
                if self.queue_timeout == 0 or not self._cond.wait_for(
                    lambda: len(self._items) < self.max_queue_size or self._closing,
                    self.queue_timeout,
                ):
                    raise QueueFullError(
                        f"the Tally client's queue is full ({self.max_queue_size} events "
                        "waiting): the server is slow or unreachable. The event was not queued; "
                        "retry later, call flush(), or raise max_queue_size / queue_timeout"
                    )
            self._items.append(event)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tally-client-batcher", daemon=True
                )
                self._thread.start()
            if len(self._items) >= self.batch_size:
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                deadline = time.monotonic() + self.flush_interval
                while (
                    len(self._items) < self.batch_size
                    and not self._flush_waiters
                    and not self._closing
                ):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._items:
                    if self._closing:
                        return
                    self._cond.wait(self.flush_interval)
                    continue
                n = min(self.batch_size, len(self._items))
                batch = [self._items.popleft() for _ in range(n)]
                self._in_flight = n
                self._cond.notify_all()  # room for a put() waiting on a full queue
            try:
                self._send(batch)
            except Exception:  # the sender reports its own failures; never let the thread die
                log.exception("sending a batch of tracked events failed")
            finally:
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued event was sent or given up on. False on timeout."""
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._items and not self._in_flight, timeout)
            finally:
                self._flush_waiters -= 1

    def close(self, timeout: float | None = None) -> bool:
        ok = self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout if ok else 0.5)
        return ok


def _close_at_exit(ref: weakref.ref[Tally]) -> None:
    client = ref()
    if client is not None and not client.closed:
        try:
            client.close(timeout=client.exit_timeout)
        except TallyClientError as exc:
            log.error("tally client at exit: %s", exc)


class Tally:
    """Synchronous Tally client.

    ``url``: the server (``tally run`` prints it); ``api_key``: the tenant's key. ``wait``:
    ``"stored"`` or ``"broker"`` for ingest (default: the server's). Batching: ``batch_size``
    events or ``flush_interval`` seconds, whichever comes first. ``max_queue_size`` bounds the
    queue; when full, ``track`` waits up to ``queue_timeout`` seconds (0: not at all, None:
    forever) and then raises ``QueueFullError``. ``on_error(error, events)`` is called for
    tracked events that cannot be delivered (also raised by the next ``flush``/``close``).
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        api_key: str = "",
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        wait: str | None = None,
        batch_size: int = 500,
        flush_interval: float = 1.0,
        max_queue_size: int = 10_000,
        queue_timeout: float | None = 0.0,
        max_batch: int = MAX_BATCH,
        on_error: ErrorHandler | None = None,
        exit_timeout: float = 30.0,
        http_client: httpx.Client | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required (the tenant's key, tly_...)")
        if not 1 <= batch_size <= max_batch:
            raise ValueError(f"batch_size must be between 1 and max_batch ({max_batch})")
        self.transport = Transport(
            url,
            api_key,
            timeout=timeout,
            retry=retry or RetryPolicy(),
            http=http_client,
            headers=headers,
        )
        self.wait = wait
        self.max_batch = max_batch
        self.on_error = on_error
        self.exit_timeout = exit_timeout
        self.closed = False
        self._failures: list[tuple[Exception, list[dict[str, Any]]]] = []
        self._failures_lock = threading.Lock()
        self._batcher = Batcher(
            self._deliver,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_queue_size=max_queue_size,
            queue_timeout=queue_timeout,
        )
        self.meters = Meters(self)
        self.plans = Plans(self)
        self.customers = Customers(self)
        self.subscriptions = Subscriptions(self)
        self.invoices = Invoices(self)
        self.rating = Rating(self)
        self.segment = Segment(self)
        # A hook of its own (unregister removes only it), holding the client weakly.
        self._exit_hook = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)

    # -- events ---------------------------------------------------------------------------------

    def track(
        self,
        type: str,
        customer: str,
        properties: Mapping[str, Any] | None = None,
        *,
        id: str | None = None,
        time: datetime | str | int | None = None,
    ) -> str:
        """Queue one event for the background sender; returns its id (generated if not given).
        Raises ``QueueFullError`` when the queue stays full, never drops silently."""
        event = build_event(type, customer, properties, id=id, time=time)
        self._batcher.put(event)
        return str(event["id"])

    def enqueue(self, event: Mapping[str, Any] | BaseModel) -> str:
        """Queue a complete event (a dict or ``schemas.events.Event``; ``id`` required)."""
        doc = as_event(event)
        self._batcher.put(doc)
        return str(doc["id"])

    def ingest(
        self, events: Sequence[Mapping[str, Any] | BaseModel], *, wait: str | None = None
    ) -> IngestResult:
        """Send events now (chunks of ``max_batch``, retried with the same ids) and return what
        the server accepted and rejected (indexes into ``events``)."""
        self._check_open()
        docs = [as_event(e) for e in events]
        return self.transport.ingest(docs, wait or self.wait, self.max_batch)

    @property
    def pending(self) -> int:
        """Tracked events not yet acknowledged (queued or in flight)."""
        return self._batcher.pending

    def flush(self, timeout: float | None = None) -> None:
        """Send everything tracked so far and wait for the answers. Raises ``DeliveryError``
        for events that could not be delivered since the last flush, ``TimeoutError`` if
        ``timeout`` passed first."""
        if not self._batcher.flush(timeout):
            raise TimeoutError(f"{self.pending} tracked events still pending after {timeout}s")
        self._raise_failures()

    def close(self, timeout: float | None = None) -> None:
        """Flush, then release the connection. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self._batcher.close(timeout):
                log.error("tally client closed with %d tracked events not delivered", self.pending)
        finally:
            self.transport.close()
            atexit.unregister(self._exit_hook)
        self._raise_failures()

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # do not mask the caller's exception
            try:
                self.close()
            except TallyClientError as exc:
                log.error("tally client: %s", exc)

    def _check_open(self) -> None:
        if self.closed:
            raise ClientClosedError("the client is closed; create a new one")

    def _deliver(self, batch: list[dict[str, Any]]) -> None:
        try:
            result = self.transport.ingest(batch, self.wait, self.max_batch)
        except Exception as exc:
            self._failed(exc, batch)
            return
        if result.rejected:
            bad = sorted({e.index for e in result.rejected})
            self._failed(rejected_error(result), [batch[i] for i in bad])

    def _failed(self, exc: Exception, events: list[dict[str, Any]]) -> None:
        log.error("tally client: %d tracked events not delivered: %s", len(events), exc)
        with self._failures_lock:
            self._failures.append((exc, events))
        if self.on_error is not None:
            try:
                self.on_error(exc, events)
            except Exception:
                log.exception("the on_error callback raised")

    def _raise_failures(self) -> None:
        with self._failures_lock:
            failures, self._failures = self._failures, []
        if failures:
            raise DeliveryError(failures)

    # -- plain requests -------------------------------------------------------------------------

    def _call(self, c: Call[T]) -> T:
        self._check_open()
        return self.transport.call(c)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Iterable[tuple[str, str]] = (),
        json: Any = None,
        idempotent: bool | None = None,
    ) -> Any:
        """Any endpoint, answer as decoded JSON. ``idempotent`` defaults to True for every
        method but POST (decides whether a lost answer is retried)."""
        same = method.upper() != "POST" if idempotent is None else idempotent
        return self._call(
            Call(method.upper(), path, raw, params=list(params), body=json, idempotent=same)
        )


# --- resources ---------------------------------------------------------------------------------


class _Resource:
    def __init__(self, client: Tally) -> None:
        self._call = client._call


class Meters(_Resource):
    def create(self, spec: MeterSpec | Body) -> Meter:
        return self._call(calls.create_meter(spec))

    def list(self) -> builtins.list[Meter]:
        return self._call(calls.list_meters())

    def get(self, slug: str) -> Meter:
        return self._call(calls.get_meter(slug))

    def delete(self, slug: str) -> None:
        self._call(calls.delete_meter(slug))

    def usage(
        self,
        slug: str,
        *,
        from_: datetime | str | None = None,
        to: datetime | str | None = None,
        window: str | None = None,
        tz: str | None = None,
        customers: Iterable[str] = (),
        group_by: Iterable[str] = (),
        filters: Mapping[str, str | Iterable[str]] | None = None,
    ) -> UsageResult:
        """Usage of meter ``slug`` over ``[from_, to)`` (whole minutes), per ``window``."""
        return self._call(
            calls.usage(
                slug,
                from_=from_,
                to=to,
                window=window,
                tz=tz,
                customers=customers,
                group_by=group_by,
                filters=filters,
            )
        )


class Plans(_Resource):
    def create(self, spec: PlanSpec | Body) -> PlanVersion:
        return self._call(calls.create_plan(spec))

    def list(self) -> builtins.list[PlanVersion]:
        return self._call(calls.list_plans())

    def get(self, code: str, version: int | None = None) -> PlanVersion:
        return self._call(calls.get_plan(code, version))

    def publish_version(self, code: str, draft: PlanDraft | Body) -> PlanVersion:
        return self._call(calls.publish_plan_version(code, draft))

    def versions(self, code: str) -> builtins.list[PlanVersion]:
        return self._call(calls.list_plan_versions(code))


class Customers(_Resource):
    def create(self, customer: CustomerIn | Body) -> Customer:
        return self._call(calls.create_customer(customer))

    def get(self, external_id: str) -> Customer:
        return self._call(calls.get_customer(external_id))

    def list(self, limit: int = 100, offset: int = 0) -> builtins.list[Customer]:
        return self._call(calls.list_customers(limit, offset))

    def update(self, external_id: str, patch: CustomerPatch | Body) -> Customer:
        return self._call(calls.update_customer(external_id, patch))


class Subscriptions(_Resource):
    def create(self, sub: SubscriptionIn | Body) -> Subscription:
        return self._call(calls.create_subscription(sub))

    def get(self, sub_id: str) -> Subscription:
        return self._call(calls.get_subscription(sub_id))

    def list(self, customer_id: str | None = None) -> builtins.list[Subscription]:
        return self._call(calls.list_subscriptions(customer_id))

    def action(self, sub_id: str, action: str, at: str = "now") -> Subscription:
        return self._call(calls.subscription_action(sub_id, action, at))

    def change_plan(
        self, sub_id: str, plan_code: str, version: int | None = None, timing: str | None = None
    ) -> Subscription:
        return self._call(calls.change_plan(sub_id, plan_code, version, timing))


class Invoices(_Resource):
    def upcoming(self, customer_id: str) -> UpcomingInvoice:
        return self._call(calls.upcoming_invoice(customer_id))


class Rating(_Resource):
    def preview(self, req: PreviewIn | Body) -> PreviewOut:
        return self._call(calls.preview(req))


class Segment(_Resource):
    def config(self) -> SegmentConfig:
        return self._call(calls.segment_config())

    def set_config(self, cfg: SegmentConfigIn | Body) -> SegmentConfig:
        return self._call(calls.set_segment_config(cfg))

    def set_webhook_secret(self, req: WebhookSecretIn | Body | None = None) -> WebhookSecretOut:
        return self._call(calls.set_webhook_secret(req))
