"""Readiness of the stream worker(s), judged from their statuses (pure: no I/O).

Embedded mode judges the worker in the process (``WorkerRunner.status()``); scale-out API
processes judge the newest heartbeat row of every worker of the topic (``worker_heartbeats``).
A worker counts as *live* when its status is ``running`` and fresh (taken within ``stale_s``).
The check is red when no worker is live, or when a live worker has been failing to commit (store
errors, unresolved commits, partition set-up) for longer than ``max_failing_s``.

``evaluate_lag`` judges a lag measurement (``streams.lag.LagReport``): the ``lag`` check is red
when more than ``max_lag`` messages wait unstored, the ``freshness`` check when the oldest of them
is older than ``max_freshness_s``. Freshness is what catches a stuck consumer (the peer's bug:
lag grew for 16 h with health green): a worker that is alive, heartbeating and failing nothing,
but stores nothing while messages wait, ages its oldest waiting message past the threshold
whatever the load. A measurement that failed, or is older than ``stale_s``, is *unknown*, which
is red too: readiness is never claimed without evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.timeutil import from_epoch_ms
from schemas.worker import WorkerStatus
from streams.lag import LagReport


@dataclass(frozen=True)
class WorkerCheck:
    ok: bool
    summary: str  # "ok" or the reason it is not
    info: dict[str, Any] = field(default_factory=dict)


def stale_after_s(heartbeat_s: float) -> float:
    """A status older than this is not fresh: three missed heartbeats (at least 10 s)."""
    return max(3 * heartbeat_s, 10.0)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return from_epoch_ms(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe(st: WorkerStatus, now_ms: int) -> dict[str, Any]:
    """A status as JSON for /readyz."""
    return {
        "id": st.worker_id,
        "state": st.state,
        "partitions": list(st.partitions),
        "last_commit_at": _iso(st.last_commit_ms),
        "failing_since": _iso(st.failing_since_ms),
        "failing_for_s": (
            None if st.failing_since_ms is None else round((now_ms - st.failing_since_ms) / 1000, 1)
        ),
        "last_error": st.last_error or None,
        "status_age_s": round(max(0, now_ms - st.beat_ms) / 1000, 1),
    }


def evaluate(
    statuses: list[WorkerStatus], now_ms: int, *, max_failing_s: float, stale_s: float
) -> WorkerCheck:
    """Judge the workers' statuses (see the module docstring)."""
    info: dict[str, Any] = {"workers": [describe(s, now_ms) for s in statuses]}
    if not statuses:
        return WorkerCheck(False, f"no worker status in the last {stale_s:g} s", info)
    fresh = [s for s in statuses if now_ms - s.beat_ms <= stale_s * 1000]
    live = [s for s in fresh if s.state == "running"]
    if not live:
        if any(s.state == "starting" for s in fresh):
            return WorkerCheck(False, "starting", info)
        if fresh:
            return WorkerCheck(False, "stopped", info)
        return WorkerCheck(False, f"no worker status in the last {stale_s:g} s", info)
    failing = [
        s
        for s in live
        if s.failing_since_ms is not None and now_ms - s.failing_since_ms > max_failing_s * 1000
    ]
    if failing:
        worst = min(failing, key=lambda s: s.failing_since_ms or now_ms)
        secs = (now_ms - (worst.failing_since_ms or now_ms)) / 1000
        why = f": {worst.last_error}" if worst.last_error else ""
        return WorkerCheck(False, f"cannot commit for {secs:.0f} s{why}", info)
    return WorkerCheck(True, "ok", info)


def evaluate_lag(
    report: LagReport | None,
    now_ms: int,
    *,
    max_lag: int,
    max_freshness_s: float,
    stale_s: float,
) -> tuple[WorkerCheck, WorkerCheck]:
    """The ``lag`` and ``freshness`` checks of a measurement (see the module docstring)."""
    if report is None:
        unknown = WorkerCheck(False, "unknown: not measured yet", {})
        return unknown, unknown
    info = report.describe(now_ms)
    if report.error:
        unknown = WorkerCheck(False, f"unknown: {report.error}", info)
        return unknown, unknown
    age_s = (now_ms - report.measured_ms) / 1000
    if age_s > stale_s:
        unknown = WorkerCheck(False, f"unknown: last measured {age_s:.0f} s ago", info)
        return unknown, unknown
    total = report.total_lag
    info_lag = {**info, "max": max_lag}
    if total > max_lag:
        worst = max(report.partitions, key=lambda p: (p.lag, -p.partition))
        lag = WorkerCheck(
            False,
            f"{total} messages wait unstored (max {max_lag}); partition {worst.partition} "
            f"is {worst.lag} behind",
            info_lag,
        )
    else:
        lag = WorkerCheck(True, "ok", info_lag)
    fresh_s = report.freshness_s(now_ms)
    info_fresh = {"seconds": round(fresh_s, 3), "max_s": max_freshness_s}
    if fresh_s > max_freshness_s:
        waiting = [p for p in report.partitions if p.freshness_s(now_ms) > max_freshness_s]
        parts = ", ".join(str(p.partition) for p in waiting)
        freshness = WorkerCheck(
            False,
            f"the oldest unstored message is {fresh_s:.0f} s old (max {max_freshness_s:g} s) "
            f"in partitions {parts}: the worker is stuck or too slow",
            info_fresh,
        )
    else:
        freshness = WorkerCheck(True, "ok", info_fresh)
    return lag, freshness
