"""The FastAPI app factory. Every dependency is injected; nothing is read from the environment.

``create_app(settings, store, producer=..., progress_waiter=...)`` stores them on
``app.state.tally`` (``api.state.AppState``). The lifespan loads ``settings.meters_file`` (if set),
registers a fixed ``settings.admin_token`` (if set) and runs the counter flush task (key last-used
times, monthly event counts; a final flush at shutdown); it closes nothing else, because it
created nothing: whoever made the store and the producer closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI

from api import (
    admin,
    catalog,
    deadletters,
    health,
    ingest,
    invoices,
    keys,
    meters,
    openapi,
    segment,
    usage,
    webhooks,
)
from api import errors as api_errors
from api.auth import Authenticator
from api.limits import InflightMiddleware, TenantLimiter
from api.meterlookup import MeterLookup
from api.meters_file import load_meters_file
from api.producer import EventProducer
from api.state import AppState, Metrics, ProgressWaiter
from clickhouse.limits import LimitsRepo
from schemas.usage import UsageMeter
from schemas.worker import WorkerStatus
from streams.lag import LagReport
from tally.settings import Settings

log = logging.getLogger(__name__)


def _default_store_concurrency(settings: Settings) -> int:
    # chDB (embedded) runs in-process: one call at a time. A ClickHouse server takes several.
    return 8 if settings.clickhouse_url.startswith(("http://", "https://")) else 1


def routers() -> tuple[APIRouter, ...]:
    """Every router of the API, in the order ``create_app`` includes them."""
    modules = (
        ingest,
        meters,
        usage,
        admin,
        keys,
        health,
        catalog,
        invoices,
        webhooks,
        segment,
        deadletters,
    )
    return (
        *(module.router for module in modules),
        invoices.admin_router,
        deadletters.admin_router,
    )


def create_app(
    settings: Settings,
    store: Any,
    *,
    producer: EventProducer | None,
    progress_waiter: ProgressWaiter | None,
    repo: Any = None,
    store_concurrency: int | None = None,
    billing_tasks: bool | None = None,
    worker_status: Callable[[], list[WorkerStatus]] | None = None,
    lag_source: Callable[[], LagReport | None] | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """Build the API. ``repo`` defaults to ``clickhouse.repo.Repo(store)``. ``billing_tasks``
    (default ``settings.billing_tasks``) runs the webhook/threshold task while the app lives.
    ``worker_status`` (blocking, called in a thread) gives /readyz the stream workers' statuses;
    without it /readyz has no ``worker`` check. ``lag_source`` (blocking) gives it the lag and
    freshness measurement (``lag`` and ``freshness`` checks). ``metrics``: on the process
    registry (entry points); default: a registry of this app's own."""
    if billing_tasks is None:
        billing_tasks = settings.billing_tasks
    if repo is None:
        from clickhouse.repo import Repo

        repo = Repo(store)
    state = AppState(
        settings=settings,
        store=store,
        repo=repo,
        producer=producer,
        progress_waiter=progress_waiter,
        worker_status=worker_status,
        lag_source=lag_source,
        metrics=metrics if metrics is not None else Metrics(settings=settings),
        store_limiter=anyio.CapacityLimiter(
            store_concurrency or _default_store_concurrency(settings)
        ),
    )
    state.auth = Authenticator(settings, state.metrics)
    state.limiter = TenantLimiter(settings, LimitsRepo(store), state.metrics)

    async def usage_meter(tenant_id: str, slug: str) -> UsageMeter:
        found: UsageMeter = await state.run(repo.usage_meter, tenant_id, slug)
        return found

    state.meters = MeterLookup(usage_meter, settings.meter_cache_ttl_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.admin_token:
            await state.run(repo.ensure_admin_token, settings.admin_token)
        if settings.meters_file is not None:
            await load_meters_file(state, settings.meters_file)
        tasks = None
        if billing_tasks:
            # The webhook dispatcher and the threshold check (billing.webhooks) run in this
            # process, next to the API, never in the stream worker.
            from api.billing_state import build_services

            services = build_services(settings, store, repo)
            _app.state.billing = services
            tasks = services.webhooks
            tasks.start()
        loop = asyncio.get_running_loop()
        background = [loop.create_task(state.maintain())]
        if settings.cache_keep_warm_s > 0:
            background.append(loop.create_task(state.keep_warm()))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            try:
                await state.flush_counters()
            except Exception as exc:
                log.warning("final counter flush failed: %s", exc)
            if tasks is not None:
                tasks.stop()

    app = FastAPI(
        title="Tally",
        description="Usage metering: ingest, meters, usage queries (native and OpenMeter API).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.tally = state
    api_errors.install(app)
    app.add_middleware(
        InflightMiddleware,
        limit=settings.max_inflight_requests,
        retry_after=settings.retry_after_s,
        metrics=state.metrics,
    )
    app.add_middleware(
        health.MetricsMiddleware, metrics=state.metrics, access_log=settings.access_log
    )
    for router in routers():
        app.include_router(router)
    openapi.install(app)
    return app
