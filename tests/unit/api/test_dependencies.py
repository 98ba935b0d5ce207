"""Every FastAPI dependency of the API is a coroutine function: FastAPI runs a plain ``def``
dependency in its thread pool, a hand-off to another thread and back on every request (~80 us
of CPU per call measured, a tenth of a one-event ingest request's work)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api.app import routers


def _calls(dep: Dependant) -> Iterator[Any]:
    for sub in dep.dependencies:
        yield sub.call
        yield from _calls(sub)


def test_every_dependency_runs_on_the_event_loop() -> None:
    routes = [r for router in routers() for r in router.routes if isinstance(r, APIRoute)]
    assert len(routes) > 50  # the whole API is walked
    calls = {c for route in routes for c in _calls(route.dependant)}
    assert calls, "no dependencies found"
    sync = sorted(
        f"{c.__module__}.{c.__qualname__}" for c in calls if not inspect.iscoroutinefunction(c)
    )
    assert sync == []
