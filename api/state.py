"""Per-app state (``app.state.tally``): injected dependencies, the auth cache, metrics.

No module-level globals: two apps in one process (tests) share nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar

import anyio
from fastapi import Depends, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tally.metrics import TopTenantCounter, parse_allow_list, process_registry
from tally.settings import Settings

if TYPE_CHECKING:
    from api.producer import EventProducer
    from schemas.worker import WorkerStatus
    from streams.lag import LagReport

T = TypeVar("T")
log = logging.getLogger(__name__)


class ProgressWaiter(Protocol):
    async def wait_for(self, topic: str, offsets: dict[int, int], timeout: float) -> bool: ...


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The API's Prometheus metrics, on the process registry the entry point passes (the worker's
    ``streams.metrics.WorkerMetrics`` share it in embedded mode), or on a new one (tests: two apps
    in one process share nothing). Names are a contract: docs/deploy.md lists them."""

    def __init__(
        self, registry: CollectorRegistry | None = None, settings: Settings | None = None
    ) -> None:
        self.registry = registry if registry is not None else process_registry()
        self.http_requests = Counter(
            "tally_http_requests",
            "HTTP requests by route template, method and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "tally_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["route"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.events = Counter(
            "tally_ingest_events",
            "Ingested events by source (native, cloudevents, segment) and outcome (accepted; "
            "duplicate_in_request: valid, same id as an earlier event of the request; rejected)",
            ["source", "outcome"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "tally_ingest_rejected_events",
            "Events rejected at ingest by source and reason (the field at fault, or 'atomic': "
            "valid events of a request rejected whole)",
            ["source", "reason"],
            registry=self.registry,
        )
        self.ingest_bytes = Counter(
            "tally_ingest_bytes",
            "Bytes of ingest request bodies read, by source",
            ["source"],
            registry=self.registry,
        )
        self.producer_queue = Gauge(
            "tally_producer_queue_events",
            "Events handed to the producer and not yet acknowledged by the broker",
            registry=self.registry,
        )
        self.producer_delivery = Histogram(
            "tally_producer_delivery_seconds",
            "Time from handing a request's envelopes to the producer to the broker's last ack",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.broker_errors = Counter(
            "tally_broker_errors",
            "Produce calls the broker did not acknowledge (delivery error, timeout, full queue)",
            registry=self.registry,
        )
        self.usage_query = Histogram(
            "tally_usage_query_duration_seconds",
            "Usage query time in the store by API (native, openmeter)",
            ["api"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        top_n = settings.metrics_tenant_top_n if settings is not None else 10
        allow = parse_allow_list(settings.metrics_tenants) if settings is not None else ()
        self.tenant_events = TopTenantCounter(
            "tally_tenant_events",
            "Events accepted per tenant: the busiest metrics_tenant_top_n tenants (or the "
            "metrics_tenants allow-list), the rest as tenant='other'",
            "tenant",
            top_n=top_n,
            allow=allow,
            registry=self.registry,
        )
        self.envelopes = Counter(
            "tally_ingest_envelopes",
            "Envelopes acknowledged by the broker",
            registry=self.registry,
        )
        self.produce_failures = Counter(
            "tally_ingest_produce_failures",
            "Ingest requests answered 503 because the broker did not acknowledge",
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "tally_auth_failures",
            "Failed authentications by reason (invalid, limited, lookup_budget)",
            ["reason"],
            registry=self.registry,
        )
        self.cache_renewals = Counter(
            "tally_cache_renewals",
            "Cache entries in use (cache = keys, meters, limits) re-read in the background "
            "before their TTL ran out",
            ["cache"],
            registry=self.registry,
        )
        self.auth_lookups = Counter(
            "tally_auth_store_lookups",
            "Credential lookups that went to the store (k = API key, a = admin token)",
            ["kind"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "tally_rate_limited",
            "Requests refused by a limit (429/413/503), by limit name",
            ["limit"],
            registry=self.registry,
        )
        self.wait_stored_timeouts = Counter(
            "tally_ingest_wait_stored_timeouts",
            "wait=stored requests answered 503 because the worker had not stored them in time",
            registry=self.registry,
        )
        self.segment_ignored = Counter(
            "tally_segment_messages_ignored",
            "Segment messages accepted and ignored (identify, page, screen, group, alias) by type",
            ["type"],
            registry=self.registry,
        )
        self.segment_webhook_refused = Counter(
            "tally_segment_webhook_refused",
            "Segment webhook requests answered 401, by reason (missing or bad signature, "
            "webhook not enabled)",
            ["reason"],
            registry=self.registry,
        )


@dataclass
class AppState:
    settings: Settings
    store: Any
    repo: Any
    producer: EventProducer | None
    progress_waiter: ProgressWaiter | None
    # the stream worker(s) to judge in /readyz: the in-process worker, or heartbeats (blocking)
    worker_status: Callable[[], list[WorkerStatus]] | None = None
    # the lag/freshness measurement for /readyz (blocking): the worker's own, or a probe
    lag_source: Callable[[], LagReport | None] | None = None
    # broker reachability for /readyz when this process has no producer (blocking, timeout s)
    broker_ping: Callable[[float], bool] | None = None
    metrics: Metrics = field(default_factory=Metrics)
    store_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))
    auth: Any = None  # api.auth.Authenticator, set by create_app
    limiter: Any = None  # api.limits.TenantLimiter, set by create_app
    meters: Any = None  # api.meterlookup.MeterLookup (usage queries' meters), set by create_app
    # caches whose background re-read is failing (logged once per streak, not every round)
    refresh_failing: set[str] = field(default_factory=set)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking store call in a worker thread (bounded by ``store_limiter``)."""
        call = functools.partial(fn, *args, **kwargs) if kwargs else functools.partial(fn, *args)
        return await anyio.to_thread.run_sync(call, limiter=self.store_limiter)

    async def flush_counters(self) -> None:
        """Write the batched key last-used times and monthly event counts (one insert each)."""
        uses = self.auth.take_last_used()
        if uses:
            try:
                await self.run(self.repo.credentials.record_last_used, uses)
            except Exception as exc:
                for k, ms in uses.items():  # keep them for the next round
                    self.auth.last_used[k] = max(ms, self.auth.last_used.get(k, 0))
                log.warning("writing key last-used times failed (kept, retried): %s", exc)
        await self.limiter.flush(self)

    async def refresh_caches(self) -> None:
        """One round of keeping the caches in use warm (``cache_keep_warm_s``): API keys,
        usage queries' meters and tenant limits past half their TTL, one store read each. A
        failed read is logged; the requests then read the store themselves, as without it."""
        keep = self.settings.cache_keep_warm_s
        repo = self.repo

        async def keys(pairs: list[tuple[str, str]]) -> Any:
            return await self.run(repo.credentials.lookup_api_key_hashes, pairs)

        async def meters(tenant_ids: list[str]) -> Any:
            return await self.run(repo.usage_meters_of, tenant_ids)

        rounds: list[tuple[str, Callable[[], Any]]] = [
            ("keys", lambda: self.auth.refresh(keys, keep)),
            ("meters", lambda: self.meters.refresh(meters, keep)),
            ("limits", lambda: self.limiter.refresh(self, keep)),
        ]
        for name, refresh in rounds:
            try:
                renewed = await refresh()
            except Exception as exc:
                level = logging.DEBUG if name in self.refresh_failing else logging.WARNING
                self.refresh_failing.add(name)
                log.log(level, "re-reading the %s cache in the background failed: %s", name, exc)
                continue
            if name in self.refresh_failing:
                self.refresh_failing.discard(name)
                log.info("re-reading the %s cache in the background works again", name)
            if renewed:
                self.metrics.cache_renewals.labels(name).inc(renewed)

    def keep_warm_period_s(self) -> float:
        """How often ``refresh_caches`` runs: a quarter of the shortest cache TTL, so an entry
        in use is re-read between half and three quarters of its TTL."""
        s = self.settings
        ttls = [t for t in (s.auth_positive_ttl_s, s.meter_cache_ttl_s, s.limits_cache_ttl_s) if t]
        return min(ttls) / 4

    async def keep_warm(self) -> None:
        """Background task of the app: ``refresh_caches`` every ``keep_warm_period_s``."""
        while True:
            await anyio.sleep(self.keep_warm_period_s())
            await self.refresh_caches()

    async def maintain(self) -> None:
        """Background task of the app: ``flush_counters`` every ``counters_flush_s``."""
        while True:
            await anyio.sleep(self.settings.counters_flush_s)
            try:
                await self.flush_counters()
            except Exception:
                log.exception("counter flush failed")


def state_of(request: Request) -> AppState:
    st: AppState = request.app.state.tally
    return st


async def get_state(request: Request) -> AppState:
    """FastAPI dependency: the app's state. ``async`` because FastAPI runs a plain ``def``
    dependency in its thread pool: a hand-off to another thread and back on every request."""
    return state_of(request)


# the app's state, as a route parameter: ``st: State``
State = Annotated[AppState, Depends(get_state)]
