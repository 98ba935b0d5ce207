"""The asyncio client: ``AsyncTally`` (same API as ``Tally``, with ``await``).

``track()`` is a plain (non-async) call that queues the event; a task on the running loop sends
the queue in batches. ``await flush()`` waits for the answers; ``async with`` or ``await
aclose()`` flushes and closes. If the program ends with tracked events still queued (the loop
gone), an exit hook sends them with a synchronous connection.
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import contextlib
import functools
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
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
from tally_client.client import Transport
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


class AsyncTransport:
    """Sends ``Call``s with retries over one ``httpx.AsyncClient``."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        timeout: float,
        retry: RetryPolicy,
        http: httpx.AsyncClient | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retry = retry
        self._own = http is None
        self.http = http or httpx.AsyncClient(timeout=timeout)
        self.headers = {
            "Authorization": f"Bearer {api_key}",
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            **(headers or {}),
        }
        self.closed = False
        self.attempts = 0

    async def call(self, c: Call[T]) -> T:
        content = dumps(c.body) if c.body is not None else None
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            self.attempts += 1
            err: TallyClientError
            try:
                resp = await self.http.request(
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
            await asyncio.sleep(wait)
            if self.closed:
                raise ClientClosedError("the client was closed while retrying") from err

    async def ingest(
        self, events: list[dict[str, Any]], wait: str | None, batch: int
    ) -> IngestResult:
        parts: list[tuple[int, IngestResult]] = []
        for offset, chunk in chunks(events, batch):
            parts.append((offset, await self._ingest_chunk(list(chunk), wait)))
        return merge_results(parts)

    async def _ingest_chunk(self, events: list[dict[str, Any]], wait: str | None) -> IngestResult:
        try:
            return await self.call(ingest_call(events, wait))
        except ApiError as exc:
            if not split_on_413(exc, len(events)):
                raise
            half = len(events) // 2
            first = await self._ingest_chunk(events[:half], wait)
            second = await self._ingest_chunk(events[half:], wait)
            return merge_results([(0, first), (half, second)])

    async def aclose(self) -> None:
        self.closed = True
        if self._own:
            await self.http.aclose()


class AsyncBatcher:
    """The bounded queue of tracked events and the task that sends it in batches."""

    def __init__(
        self,
        send: Callable[[list[dict[str, Any]]], Awaitable[None]],
        *,
        batch_size: int,
        flush_interval: float,
        max_queue_size: int,
    ) -> None:
        self._send = send
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue_size = max_queue_size
        self.items: deque[dict[str, Any]] = deque()
        self.in_flight: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def pending(self) -> int:
        return len(self.items) + len(self.in_flight)

    def put(self, event: dict[str, Any]) -> None:
        if self._closing:
            raise ClientClosedError("the client is closed; create a new one")
        if len(self.items) >= self.max_queue_size:
            raise QueueFullError(
                f"the Tally client's queue is full ({self.max_queue_size} events waiting): the "
                "server is slow or unreachable. The event was not queued; retry later, await "
                "flush(), or raise max_queue_size"
            )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "AsyncTally.track() needs a running event loop; use Tally in synchronous code"
            ) from None
        self.items.append(event)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="tally-client-batcher")
        if len(self.items) >= self.batch_size:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            while self.items:
                n = min(self.batch_size, len(self.items))
                self.in_flight = [self.items.popleft() for _ in range(n)]
                try:
                    await self._send(self.in_flight)
                except asyncio.CancelledError:
                    self.items.extendleft(reversed(self.in_flight))  # kept for the exit hook
                    self.in_flight = []
                    raise
                except Exception:
                    log.exception("sending a batch of tracked events failed")
                self.in_flight = []
                self._changed.set()
            self._changed.set()
            if self._closing:
                return

    async def flush(self) -> None:
        while self.pending:
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._run())
            self._changed.clear()
            self._wake.set()
            await self._changed.wait()

    async def close(self) -> None:
        await self.flush()
        self._closing = True
        self._wake.set()
        if self._task is not None and not self._task.done():
            await self._task


def _send_at_exit(ref: weakref.ref[AsyncTally]) -> None:
    client = ref()
    if client is None or client.closed or not client._batcher.pending:
        return
    events = list(client._batcher.in_flight) + list(client._batcher.items)
    log.warning(
        "AsyncTally was not closed; sending its %d queued events at exit (use `async with` or "
        "`await client.aclose()`)",
        len(events),
    )
    t = client.transport
    sync = Transport(t.base, t.api_key, timeout=t.timeout, retry=t.retry)
    try:
        result = sync.ingest(events, client.wait, client.max_batch)
        if result.rejected:
            log.error("tally client at exit: %s", rejected_error(result))
    except TallyClientError as exc:
        log.error("tally client at exit: %d events not delivered: %s", len(events), exc)
    finally:
        sync.close()


class AsyncTally:
    """Asyncio Tally client; the options are those of ``tally_client.Tally``."""

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
        max_batch: int = MAX_BATCH,
        on_error: ErrorHandler | None = None,
        http_client: httpx.AsyncClient | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required (the tenant's key, tly_...)")
        if not 1 <= batch_size <= max_batch:
            raise ValueError(f"batch_size must be between 1 and max_batch ({max_batch})")
        self.transport = AsyncTransport(
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
        self.closed = False
        self._failures: list[tuple[Exception, list[dict[str, Any]]]] = []
        self._batcher = AsyncBatcher(
            self._deliver,
            batch_size=batch_size,
            flush_interval=flush_interval,
            max_queue_size=max_queue_size,
        )
        self.meters = AsyncMeters(self)
        self.plans = AsyncPlans(self)
        self.customers = AsyncCustomers(self)
        self.subscriptions = AsyncSubscriptions(self)
        self.invoices = AsyncInvoices(self)
        self.rating = AsyncRating(self)
        self.segment = AsyncSegment(self)
        self._exit_hook = functools.partial(_send_at_exit, weakref.ref(self))
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
        """Queue one event (no await needed); returns its id. ``QueueFullError`` when full."""
        event = build_event(type, customer, properties, id=id, time=time)
        self._batcher.put(event)
        return str(event["id"])

    def enqueue(self, event: Mapping[str, Any] | BaseModel) -> str:
        doc = as_event(event)
        self._batcher.put(doc)
        return str(doc["id"])

    async def ingest(
        self, events: Sequence[Mapping[str, Any] | BaseModel], *, wait: str | None = None
    ) -> IngestResult:
        self._check_open()
        docs = [as_event(e) for e in events]
        return await self.transport.ingest(docs, wait or self.wait, self.max_batch)

    @property
    def pending(self) -> int:
        return self._batcher.pending

    async def flush(self) -> None:
        await self._batcher.flush()
        self._raise_failures()

    async def aclose(self) -> None:
        if self.closed:
            return
        try:
            await self._batcher.close()
        finally:
            self.closed = True
            await self.transport.aclose()
            atexit.unregister(self._exit_hook)
        self._raise_failures()

    async def __aenter__(self) -> AsyncTally:
        return self

    async def __aexit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            await self.aclose()
        else:
            try:
                await self.aclose()
            except TallyClientError as exc:
                log.error("tally client: %s", exc)

    def _check_open(self) -> None:
        if self.closed:
            raise ClientClosedError("the client is closed; create a new one")

    async def _deliver(self, batch: list[dict[str, Any]]) -> None:
        try:
            result = await self.transport.ingest(batch, self.wait, self.max_batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc, list(batch))
            return
        if result.rejected:
            bad = sorted({e.index for e in result.rejected})
            self._failed(rejected_error(result), [batch[i] for i in bad])

    def _failed(self, exc: Exception, events: list[dict[str, Any]]) -> None:
        log.error("tally client: %d tracked events not delivered: %s", len(events), exc)
        self._failures.append((exc, events))
        if self.on_error is not None:
            try:
                self.on_error(exc, events)
            except Exception:
                log.exception("the on_error callback raised")

    def _raise_failures(self) -> None:
        failures, self._failures = self._failures, []
        if failures:
            raise DeliveryError(failures)

    # -- plain requests -------------------------------------------------------------------------

    async def _call(self, c: Call[T]) -> T:
        self._check_open()
        return await self.transport.call(c)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Iterable[tuple[str, str]] = (),
        json: Any = None,
        idempotent: bool | None = None,
    ) -> Any:
        same = method.upper() != "POST" if idempotent is None else idempotent
        return await self._call(
            Call(method.upper(), path, raw, params=list(params), body=json, idempotent=same)
        )


# --- resources ---------------------------------------------------------------------------------


class _AsyncResource:
    def __init__(self, client: AsyncTally) -> None:
        self._call = client._call


class AsyncMeters(_AsyncResource):
    async def create(self, spec: MeterSpec | Body) -> Meter:
        return await self._call(calls.create_meter(spec))

    async def list(self) -> builtins.list[Meter]:
        return await self._call(calls.list_meters())

    async def get(self, slug: str) -> Meter:
        return await self._call(calls.get_meter(slug))

    async def delete(self, slug: str) -> None:
        await self._call(calls.delete_meter(slug))

    async def usage(
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
        return await self._call(
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


class AsyncPlans(_AsyncResource):
    async def create(self, spec: PlanSpec | Body) -> PlanVersion:
        return await self._call(calls.create_plan(spec))

    async def list(self) -> builtins.list[PlanVersion]:
        return await self._call(calls.list_plans())

    async def get(self, code: str, version: int | None = None) -> PlanVersion:
        return await self._call(calls.get_plan(code, version))

    async def publish_version(self, code: str, draft: PlanDraft | Body) -> PlanVersion:
        return await self._call(calls.publish_plan_version(code, draft))

    async def versions(self, code: str) -> builtins.list[PlanVersion]:
        return await self._call(calls.list_plan_versions(code))


class AsyncCustomers(_AsyncResource):
    async def create(self, customer: CustomerIn | Body) -> Customer:
        return await self._call(calls.create_customer(customer))

    async def get(self, external_id: str) -> Customer:
        return await self._call(calls.get_customer(external_id))

    async def list(self, limit: int = 100, offset: int = 0) -> builtins.list[Customer]:
        return await self._call(calls.list_customers(limit, offset))

    async def update(self, external_id: str, patch: CustomerPatch | Body) -> Customer:
        return await self._call(calls.update_customer(external_id, patch))


class AsyncSubscriptions(_AsyncResource):
    async def create(self, sub: SubscriptionIn | Body) -> Subscription:
        return await self._call(calls.create_subscription(sub))

    async def get(self, sub_id: str) -> Subscription:
        return await self._call(calls.get_subscription(sub_id))

    async def list(self, customer_id: str | None = None) -> builtins.list[Subscription]:
        return await self._call(calls.list_subscriptions(customer_id))

    async def action(self, sub_id: str, action: str, at: str = "now") -> Subscription:
        return await self._call(calls.subscription_action(sub_id, action, at))

    async def change_plan(
        self, sub_id: str, plan_code: str, version: int | None = None, timing: str | None = None
    ) -> Subscription:
        return await self._call(calls.change_plan(sub_id, plan_code, version, timing))


class AsyncInvoices(_AsyncResource):
    async def upcoming(self, customer_id: str) -> UpcomingInvoice:
        return await self._call(calls.upcoming_invoice(customer_id))


class AsyncRating(_AsyncResource):
    async def preview(self, req: PreviewIn | Body) -> PreviewOut:
        return await self._call(calls.preview(req))


class AsyncSegment(_AsyncResource):
    async def config(self) -> SegmentConfig:
        return await self._call(calls.segment_config())

    async def set_config(self, cfg: SegmentConfigIn | Body) -> SegmentConfig:
        return await self._call(calls.set_segment_config(cfg))

    async def set_webhook_secret(
        self, req: WebhookSecretIn | Body | None = None
    ) -> WebhookSecretOut:
        return await self._call(calls.set_webhook_secret(req))
