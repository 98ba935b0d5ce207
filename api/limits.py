"""Per-tenant rate limits and monthly quota; load shedding of the whole process.

Limits (names are the ``field`` of the 429/413 error details and the keys of the admin API):

- ``requests_per_second``: every tenant-authenticated request (charged by ``api.auth``);
- ``events_per_second``: valid events of ingest requests, every flavour (``api.ingest.deliver``);
- ``max_batch_events``: valid events in one ingest request (413: retrying the same batch cannot
  help); on top of each flavour's own request limits (``max_events_per_request``, Segment's);
- ``monthly_events``: events accepted (acknowledged by the broker) per UTC calendar month.

Defaults come from settings (``tenant_*``); per-tenant overrides are stored (``tenant_limits``,
``PUT /v1/admin/tenants/{id}/limits``) and cached here for ``limits_cache_ttl_s``. 0 = unlimited.

Rates are token buckets held in this process (bucket size ``rate * rate_limit_burst_s``; a batch
larger than that passes once the bucket holds a bucket's worth and leaves it in debt, so in any
``t`` seconds a tenant gets at most ``rate * (burst_s + t)`` plus one batch). With several API processes each enforces ``rate /
api_replicas``: set ``TALLY_API_REPLICAS`` to the number of replicas behind the load balancer. A
shared limiter would need a shared counter store on the request path, which Tally does not have
(ClickHouse is no place for per-request writes); per-process buckets cost nothing per request.

The monthly quota is checked against: the stored total (``tenant_monthly_events``, re-read every
``counters_flush_s`` after this process flushed its own counts) + what this process accepted
since + what it has in flight. Exact for one process; with N processes it can overshoot by what
the others accepted within one ``counters_flush_s`` (they flush then). A crash loses at most the
last ``counters_flush_s`` of this process's counts (under-count); a store write that fails
ambiguously and is retried may count a batch twice (over-count). Client retries of an already
acknowledged batch are counted again (they are accepted again; usage dedupes them).

Shedding: at most ``max_inflight_requests`` requests (``InflightMiddleware``, health and metrics
exempt) and ``max_inflight_events`` ingest events are in progress at once; beyond: 503
``overloaded`` + Retry-After. This bounds memory whatever the offered load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from api.ratelimit import Hit, KeyedBuckets, TTLCache, retry_after_s
from clickhouse.limits import LimitOverrides, LimitsRepo
from schemas.timeutil import utc_now
from tally.errors import Overloaded, PayloadTooLarge, QuotaExceeded, RateLimited, detail
from tally.settings import Settings

if TYPE_CHECKING:
    from api.state import AppState

log = logging.getLogger(__name__)

MAX_TENANTS = 100_000
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@dataclass(frozen=True)
class EffectiveLimits:
    """The limits that apply to a tenant (0 = unlimited), cluster-wide values."""

    requests_per_second: float
    events_per_second: float
    max_batch_events: int
    monthly_events: int

    def to_json(self) -> dict[str, Any]:
        return {
            "requests_per_second": self.requests_per_second,
            "events_per_second": self.events_per_second,
            "max_batch_events": self.max_batch_events,
            "monthly_events": self.monthly_events,
        }


def effective_limits(settings: Settings, o: LimitOverrides) -> EffectiveLimits:
    s = settings
    return EffectiveLimits(
        requests_per_second=(
            s.tenant_requests_per_s if o.requests_per_second is None else o.requests_per_second
        ),
        events_per_second=(
            s.tenant_events_per_s if o.events_per_second is None else o.events_per_second
        ),
        max_batch_events=(
            s.tenant_max_batch_events if o.max_batch_events is None else o.max_batch_events
        ),
        monthly_events=s.tenant_monthly_events if o.monthly_events is None else o.monthly_events,
    )


def month_of(now: datetime) -> date:
    return date(now.year, now.month, 1)


def next_month(month: date) -> datetime:
    if month.month == 12:
        return datetime(month.year + 1, 1, 1, tzinfo=UTC)
    return datetime(month.year, month.month + 1, 1, tzinfo=UTC)


@dataclass
class Reservation:
    """Events admitted for one ingest request (in flight until committed or released)."""

    tenant_id: str
    month: date
    events: int
    done: bool = False


class TenantLimiter:
    """Token buckets, cached limits and monthly counts of one API process."""

    def __init__(
        self,
        settings: Settings,
        repo: LimitsRepo,
        metrics: Any = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.metrics = metrics
        self.clock = clock
        self.wallclock = wallclock
        self._policies: TTLCache[str, EffectiveLimits] = TTLCache(MAX_TENANTS)
        self._invalidations = 0
        self._loading: dict[Any, asyncio.Future[Any]] = {}
        self._requests: KeyedBuckets[str] = KeyedBuckets(MAX_TENANTS)
        self._events: KeyedBuckets[str] = KeyedBuckets(MAX_TENANTS)
        self.stored: dict[tuple[str, date], int] = {}
        self.flushing: dict[tuple[str, date], int] = {}
        self.unflushed: dict[tuple[str, date], int] = {}
        self.reserved: dict[tuple[str, date], int] = {}
        self.inflight_events = 0

    # --- cached reads (single flight per key) -----------------------------------------------
    async def _once(self, key: Any, make: Callable[[], Any]) -> Any:
        fut = self._loading.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            value = await make()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()
            raise
        else:
            fut.set_result(value)
            return value
        finally:
            self._loading.pop(key, None)

    async def limits(self, st: AppState, tenant_id: str) -> EffectiveLimits:
        hit, cached = self._policies.get(tenant_id, self.clock())
        if hit is Hit.FRESH and cached is not None:
            return cached

        async def load() -> EffectiveLimits:
            overrides: LimitOverrides = await st.run(self.repo.get, tenant_id)
            eff = effective_limits(self.settings, overrides)
            self._policies.put(tenant_id, eff, self.settings.limits_cache_ttl_s, self.clock())
            return eff

        result: EffectiveLimits = await self._once(("limits", tenant_id), load)
        return result

    async def refresh(self, st: AppState, keep_warm_s: float) -> int:
        """Re-read in one statement the limits of the tenants that asked for them in the last
        ``keep_warm_s``, once one tenant's cached limits are past half their TTL
        (``TTLCache.renew_due``), so that their requests do not wait for the store. Returns how
        many tenants were renewed."""

        async def read(due: list[tuple[str, EffectiveLimits]]) -> dict[str, EffectiveLimits]:
            tenants = [t for t, _eff in due]
            found: dict[str, LimitOverrides] = await st.run(self.repo.get_many, tenants)
            default = LimitOverrides()
            return {t: effective_limits(self.settings, found.get(t, default)) for t in tenants}

        renewed, _gone = await self._policies.renew_due(
            self.settings.limits_cache_ttl_s,
            keep_warm_s,
            self.clock(),
            read,
            lambda: self._invalidations,
        )
        return renewed

    def invalidate(self, tenant_id: str) -> None:
        self._invalidations += 1
        self._policies.pop(tenant_id)

    async def _stored_total(self, st: AppState, tenant_id: str, month: date) -> int:
        key = (tenant_id, month)
        if key in self.stored:
            return self.stored[key]

        async def load() -> int:
            totals = await st.run(self.repo.month_totals, [tenant_id], month)
            self.stored.setdefault(key, int(totals.get(tenant_id, 0)))
            return self.stored[key]

        result: int = await self._once(("month", key), load)
        return result

    def month_estimate(self, tenant_id: str, month: date) -> int:
        key = (tenant_id, month)
        return (
            self.stored.get(key, 0)
            + self.flushing.get(key, 0)
            + self.unflushed.get(key, 0)
            + self.reserved.get(key, 0)
        )

    # --- enforcement ------------------------------------------------------------------------
    def _limited(self, limit: str) -> None:
        if self.metrics is not None:
            self.metrics.rate_limited.labels(limit).inc()

    def _per_process(self, rate: float) -> float:
        return rate / self.settings.api_replicas

    async def charge_request(self, st: AppState, tenant_id: str) -> None:
        lim = await self.limits(st, tenant_id)
        if lim.requests_per_second <= 0:
            return
        rate = self._per_process(lim.requests_per_second)
        now = self.clock()
        cap = max(1.0, rate * self.settings.rate_limit_burst_s)
        wait = self._requests.bucket(tenant_id, rate, cap, now).take(1, now)
        if wait > 0:
            self._limited("requests_per_second")
            raise RateLimited(
                f"rate limit exceeded: at most {lim.requests_per_second:g} requests per second "
                "for this tenant",
                retry_after=retry_after_s(wait),
                details=[
                    detail(
                        "requests_per_second",
                        f"limit {lim.requests_per_second:g}/s; retry after the Retry-After delay",
                    )
                ],
            )

    async def admit_events(self, st: AppState, tenant_id: str, n: int) -> Reservation:
        """Check the batch size, the monthly quota, the event rate and the process's in-flight
        events for ``n`` events; reserve them (``commit``/``release`` afterwards)."""
        lim = await self.limits(st, tenant_id)
        s = self.settings
        if 0 < lim.max_batch_events < n:
            self._limited("max_batch_events")
            raise PayloadTooLarge(
                f"{n} events in one request; this tenant's limit is {lim.max_batch_events} "
                "(max_batch_events): split the batch",
                details=[detail("max_batch_events", f"at most {lim.max_batch_events} events")],
            )
        month = month_of(self.wallclock())
        if lim.monthly_events > 0:
            await self._stored_total(st, tenant_id, month)
            used = self.month_estimate(tenant_id, month)
            if used + n > lim.monthly_events:
                self._limited("monthly_events")
                reset = next_month(month)
                until = (reset - self.wallclock()).total_seconds()
                left = max(0, lim.monthly_events - used)
                raise QuotaExceeded(
                    f"monthly event quota exceeded: {used} of {lim.monthly_events} events "
                    f"accepted this month, {left} left, this request has {n}; the quota resets "
                    f"at {reset.isoformat().replace('+00:00', 'Z')}",
                    retry_after=min(s.quota_retry_after_max_s, retry_after_s(until)),
                    details=[
                        detail(
                            "monthly_events",
                            f"limit {lim.monthly_events} per month, {left} left",
                        )
                    ],
                )
        if lim.events_per_second > 0:
            rate = self._per_process(lim.events_per_second)
            now = self.clock()
            cap = max(1.0, rate * s.rate_limit_burst_s)
            wait = self._events.bucket(tenant_id, rate, cap, now).take(n, now, debt=True)
            if wait > 0:
                self._limited("events_per_second")
                raise RateLimited(
                    f"rate limit exceeded: at most {lim.events_per_second:g} events per second "
                    f"for this tenant; this request has {n}",
                    retry_after=retry_after_s(wait),
                    details=[
                        detail(
                            "events_per_second",
                            f"limit {lim.events_per_second:g}/s; retry after the Retry-After delay",
                        )
                    ],
                )
        if self.inflight_events + n > s.max_inflight_events:
            self._limited("max_inflight_events")
            raise Overloaded(
                "the server is overloaded (too many events in flight); retry later",
                retry_after=s.retry_after_s,
                details=[detail("max_inflight_events", f"at most {s.max_inflight_events}")],
            )
        self.inflight_events += n
        key = (tenant_id, month)
        self.reserved[key] = self.reserved.get(key, 0) + n
        return Reservation(tenant_id, month, n)

    def _unreserve(self, r: Reservation) -> None:
        key = (r.tenant_id, r.month)
        left = self.reserved.get(key, 0) - r.events
        if left > 0:
            self.reserved[key] = left
        else:
            self.reserved.pop(key, None)
        self.inflight_events -= r.events

    def commit(self, r: Reservation, accepted: int) -> None:
        """``accepted`` events of the reservation were acknowledged by the broker."""
        if r.done:
            return
        r.done = True
        self._unreserve(r)
        if accepted > 0:
            key = (r.tenant_id, r.month)
            self.unflushed[key] = self.unflushed.get(key, 0) + accepted

    def release(self, r: Reservation) -> None:
        """Nothing of the reservation was accepted (or it was committed already)."""
        if r.done:
            return
        r.done = True
        self._unreserve(r)

    # --- background -------------------------------------------------------------------------
    async def flush(self, st: AppState) -> None:
        """Write this process's monthly counts, then re-read the totals of tenants with a quota."""
        batch, self.unflushed = self.unflushed, {}
        for k, v in batch.items():
            self.flushing[k] = self.flushing.get(k, 0) + v
        if batch:
            try:
                await st.run(self.repo.add_month_counts, batch)
            except Exception as exc:
                for k, v in batch.items():
                    self.flushing[k] -= v
                    self.unflushed[k] = self.unflushed.get(k, 0) + v
                log.warning("writing the monthly event counts failed (kept, retried): %s", exc)
                return
        month = month_of(self.wallclock())
        for key in [k for k in self.stored if k[1] != month]:
            del self.stored[key]
        tenants = sorted(t for t, m in self.stored if m == month)
        if not tenants:
            self.flushing.clear()
            return
        try:
            totals = await st.run(self.repo.month_totals, tenants, month)
        except Exception as exc:
            log.warning("reading the monthly event counts failed: %s", exc)
            return
        for t, n in totals.items():
            self.stored[(t, month)] = int(n)
        self.flushing.clear()


class InflightMiddleware:
    """503 ``overloaded`` (the one error body) beyond ``limit`` requests in progress."""

    def __init__(self, app: ASGIApp, limit: int, retry_after: int, metrics: Any = None) -> None:
        self.app = app
        self.limit = limit
        self.retry_after = retry_after
        self.metrics = metrics
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.limit:
            if self.metrics is not None:
                self.metrics.rate_limited.labels("max_inflight_requests").inc()
            err = Overloaded(
                "the server is overloaded (too many requests in progress); retry later",
                retry_after=self.retry_after,
                details=[detail("max_inflight_requests", f"at most {self.limit}")],
            )
            body = orjson.dumps(err.to_dict())
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", str(self.retry_after).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
