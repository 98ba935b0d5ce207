"""/metrics (Prometheus exposition), /healthz (process alive), /readyz (store, broker, worker).

``/readyz`` answers ``{"status", "checks", "components"}``: ``checks`` maps each check (``store``,
``broker`` when this process produces, ``worker`` when it knows the stream workers) to ``"ok"`` or
the reason it is not; ``components`` holds the details (the workers' partitions, last commit,
failing since, last error). 200 when every check is ok, else 503 with ``Retry-After``. The worker
check is red when no worker is running, or one cannot commit for longer than
``worker_max_failing_s`` (embedded: the worker in this process; scale-out: the heartbeats the
workers write to the store, ``streams.status``).

/healthz and /readyz are unauthenticated. /metrics is open unless ``settings.metrics_token`` is
set, then it needs ``Authorization: Bearer <metrics token>`` (401 otherwise). Metrics never carry
secrets: labels are route templates, methods, statuses and limit names (no tenant ids, no keys).
``MetricsMiddleware`` counts requests by route *template* (never the raw path, which would
explode label cardinality) and status.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import answers as A
from api.errors import error_body, json_response
from api.openapi import RETRY_AFTER, doc
from api.state import AppState, Metrics, get_state
from streams.status import evaluate, stale_after_s
from tally.errors import AuthenticationError, detail

log = logging.getLogger(__name__)
router = APIRouter()

READY_TIMEOUT_S = 3.0


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

    async def check(name: str, fn: Any, *args: Any) -> None:
        try:
            ok = await asyncio.wait_for(asyncio.to_thread(fn, *args), READY_TIMEOUT_S + 1)
            checks[name] = "ok" if ok else "unreachable"
        except Exception as exc:
            log.warning("readiness check %s failed: %s", name, exc)
            checks[name] = f"unreachable: {type(exc).__name__}"
        components[name] = {"reachable": checks[name] == "ok"}

    async def worker_check(fn: Any) -> None:
        settings = st.settings
        try:
            statuses = await asyncio.wait_for(asyncio.to_thread(fn), READY_TIMEOUT_S + 1)
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

    tasks = [check("store", _store_ping, st.store)]
    if st.producer is not None:
        tasks.append(check("broker", st.producer.ping, READY_TIMEOUT_S))
    if st.worker_status is not None:
        tasks.append(worker_check(st.worker_status))
    await asyncio.gather(*tasks)
    checks = {k: checks[k] for k in ("store", "broker", "worker") if k in checks}
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


class MetricsMiddleware:
    """Pure ASGI middleware (cheap): request count and latency per route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(scope["method"], template, str(status)).inc()
            self.metrics.http_latency.labels(template).observe(time.perf_counter() - start)
