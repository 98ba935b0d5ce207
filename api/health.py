"""/metrics (Prometheus exposition), /healthz (process alive), /readyz (every dependency named).

``/readyz`` answers ``{"status", "checks", "components"}``: ``checks`` maps each check to ``"ok"``
or the reason it is not; ``components`` holds the details. The checks, each present when this
process can judge it:

- ``store``: the store answers; ``migrations``: every migration file is applied;
- ``broker``: the broker answers a metadata request for the events topic;
- ``worker``: a stream worker runs and commits (embedded: the worker in this process; scale-out
  API: the heartbeats the workers write, ``streams.status.evaluate``); red when none runs or one
  cannot commit for longer than ``worker_max_failing_s``;
- ``lag``: messages waiting unstored, at most ``worker_max_lag``; ``freshness``: the oldest of
  them no older than ``worker_max_freshness_s`` -- a stuck consumer turns this red
  (``streams.status.evaluate_lag``; measured as ``streams.lag`` describes).

200 when every check is ok, else 503 with ``Retry-After``. The same router serves ``tally
worker``'s own port (``create_health_app``).

/healthz and /readyz are unauthenticated. /metrics is open unless ``settings.metrics_token`` is
set, then it needs ``Authorization: Bearer <metrics token>`` (401 otherwise). Metrics never carry
secrets: labels are route templates, methods, statuses and limit names (no keys; tenant ids only
in the bounded ``tally_tenant_events_total``). ``MetricsMiddleware`` counts requests by route
*template* (never the raw path, which would explode label cardinality) and status, and gives every
request an id: the ``X-Request-ID`` header when the client sent a sane one, else a new one; it is
echoed in the answer and carried by every log line of the request (``tally.log``), with the tenant
once authenticated.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Coroutine
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import answers as A
from api.errors import error_body, json_response
from api.openapi import RETRY_AFTER, doc
from api.state import AppState, Metrics, get_state
from streams.status import evaluate, evaluate_lag, stale_after_s
from tally import log as tally_log
from tally.errors import AuthenticationError, detail

log = logging.getLogger(__name__)
access = logging.getLogger("api.access")
router = APIRouter()

READY_TIMEOUT_S = 3.0
CHECK_ORDER = ("store", "migrations", "broker", "worker", "lag", "freshness")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, st: AppState = Depends(get_state)) -> Response:
    expected = st.settings.metrics_token
    if expected:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), expected.encode()
        ):
            raise AuthenticationError(
                "/metrics needs 'Authorization: Bearer <metrics token>' (TALLY_METRICS_TOKEN)",
                field="authorization",
            )
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", tags=["health"], **doc(ok={200: A.HEALTH}))
async def healthz() -> Response:
    return json_response(200, {"status": "ok"})


def _store_ping(store: Any) -> bool:
    ping = getattr(store, "ping", None)
    if callable(ping):
        return bool(ping())
    store.command("SELECT 1")
    return True


def _pending_migrations(store: Any) -> list[str]:
    pending = getattr(store, "pending_migrations", None)
    return list(pending()) if callable(pending) else []


@router.get(
    "/readyz",
    tags=["health"],
    **doc(
        ok={
            200: A.READY,
            503: {
                "description": "Not ready: the one error body plus the checks",
                "content": {"application/json": {"schema": A.NOT_READY}},
                "headers": {"Retry-After": {**RETRY_AFTER, "required": True}},
            },
        }
    ),
)
async def readyz(st: AppState = Depends(get_state)) -> Response:
    checks: dict[str, str] = {}
    components: dict[str, Any] = {}
    settings = st.settings

    async def call(fn: Any, *args: Any) -> Any:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), READY_TIMEOUT_S + 1)

    async def reach(name: str, fn: Any, *args: Any) -> bool:
        try:
            ok = await call(fn, *args)
            checks[name] = "ok" if ok else "unreachable"
        except Exception as exc:
            log.warning("readiness check %s failed: %s", name, exc)
            checks[name] = f"unreachable: {type(exc).__name__}"
        components[name] = {"reachable": checks[name] == "ok"}
        return checks[name] == "ok"

    async def store_checks() -> None:
        if not await reach("store", _store_ping, st.store):
            checks["migrations"] = "unknown: the store is unreachable"
            components["migrations"] = {"pending": None}
            return
        try:
            pending = await call(_pending_migrations, st.store)
        except Exception as exc:
            checks["migrations"] = f"unknown: {type(exc).__name__}"
            components["migrations"] = {"pending": None}
            return
        checks["migrations"] = (
            "ok" if not pending else f"{len(pending)} not applied: {', '.join(pending)}"
        )
        components["migrations"] = {"pending": pending}

    async def worker_check(fn: Any) -> None:
        try:
            statuses = await call(fn)
        except Exception as exc:
            log.warning("readiness check worker failed: %s", exc)
            checks["worker"] = f"unknown: cannot read the worker status ({type(exc).__name__})"
            components["worker"] = {"workers": []}
            return
        result = evaluate(
            statuses,
            time.time_ns() // 1_000_000,
            max_failing_s=settings.worker_max_failing_s,
            stale_s=stale_after_s(settings.worker_heartbeat_s),
        )
        checks["worker"] = result.summary
        components["worker"] = result.info

    async def lag_checks(fn: Any) -> None:
        try:
            report = await call(fn)
        except Exception as exc:
            log.warning("readiness check lag failed: %s", exc)
            checks["lag"] = checks["freshness"] = f"unknown: {type(exc).__name__}: {exc}"[:300]
            components["lag"] = components["freshness"] = {}
            return
        lag, freshness = evaluate_lag(
            report,
            time.time_ns() // 1_000_000,
            max_lag=settings.worker_max_lag,
            max_freshness_s=settings.worker_max_freshness_s,
            stale_s=stale_after_s(settings.worker_heartbeat_s),
        )
        checks["lag"], components["lag"] = lag.summary, lag.info
        checks["freshness"], components["freshness"] = freshness.summary, freshness.info

    tasks: list[Coroutine[Any, Any, Any]] = [store_checks()]
    ping = st.broker_ping or (st.producer.ping if st.producer is not None else None)
    if ping is not None:
        tasks.append(reach("broker", ping, READY_TIMEOUT_S))
    if st.worker_status is not None:
        tasks.append(worker_check(st.worker_status))
    if st.lag_source is not None:
        tasks.append(lag_checks(st.lag_source))
    await asyncio.gather(*tasks)
    checks = {k: checks[k] for k in CHECK_ORDER if k in checks}
    components = {k: components[k] for k in CHECK_ORDER if k in components}
    ready = all(v == "ok" for v in checks.values())
    if ready:
        return json_response(200, {"status": "ready", "checks": checks, "components": components})
    bad = ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok")
    details = [detail(k, v) for k, v in checks.items() if v != "ok"]
    return json_response(
        503,
        {
            # the one error shape, plus the readiness diagnostics
            **error_body("unavailable", f"not ready: {bad}", details),
            "status": "not_ready",
            "checks": checks,
            "components": components,
        },
        {"Retry-After": str(st.settings.retry_after_s)},
    )


def create_health_app(state: AppState) -> FastAPI:
    """A small app with only /metrics, /healthz and /readyz (``tally worker``'s own port)."""
    app = FastAPI(title="Tally worker", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tally = state
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.include_router(router)
    return app


class MetricsMiddleware:
    """Pure ASGI middleware (cheap): request count and latency per route template, the request
    id (``X-Request-ID``: accepted when sane, else generated; echoed) and, with ``access_log``,
    one log line per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        given = None
        for name, value in scope.get("headers") or ():
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        ctx, token = tally_log.begin_request(tally_log.accept_request_id(given))
        echo = (b"x-request-id", ctx.request_id.encode("latin-1"))

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", ()), echo]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - start
            self.metrics.http_requests.labels(scope["method"], template, str(status)).inc()
            self.metrics.http_latency.labels(template).observe(elapsed)
            if self.access_log:
                access.info(
                    "%s %s %d %.1f ms",
                    scope["method"],
                    template,
                    status,
                    elapsed * 1000,
                    extra={
                        "method": scope["method"],
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                        **ctx.fields,
                    },
                )
            tally_log.end_request(token)
