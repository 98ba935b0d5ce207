"""Fixtures: the real app (api.app.create_app) on a real chDB store, with the catalog router,
tenants with meters, and a helper that stores usage through the worker's real aggregation code
(streams.matching + streams.aggregation) and sink (clickhouse.sink.ClickHouseSink.commit)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from api.app import create_app
from clickhouse.repo import Repo
from clickhouse.sink import ClickHouseSink
from schemas.envelope import EnvelopeEvent
from schemas.meters import Meter, MeterSpec
from schemas.timeutil import epoch_ms
from streams.aggregation import WindowTable
from streams.matching import CompiledMeter
from tally.settings import Settings

METERS: list[dict[str, Any]] = [
    {"slug": "api", "event_type": "api_call", "aggregation": "count"},
    {
        "slug": "storage",
        "event_type": "storage",
        "aggregation": "max",
        "value_property": "$.gb",
    },
    {
        "slug": "compute",
        "event_type": "compute",
        "aggregation": "sum",
        "value_property": "$.seconds",
        "group_by": {"region": "$.region"},
    },
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def repo(store: Any) -> Repo:
    return Repo(store)


@pytest.fixture
async def client(store: Any, repo: Repo) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        Settings.model_validate({}), store, producer=None, progress_waiter=None, repo=repo
    )
    assert "/v1/plans" in app.openapi()["paths"]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as c:
        yield c


class Tenant:
    def __init__(self, repo: Repo, store: Any, name: str) -> None:
        t, key = repo.create_tenant(name)
        self.id = t.tenant_id
        self.key = key
        self.headers = {"Authorization": f"Bearer {key}"}
        self.meters: dict[str, Meter] = {
            m["slug"]: repo.create_meter(self.id, MeterSpec.model_validate(m)) for m in METERS
        }
        self._compiled = {slug: CompiledMeter(m) for slug, m in self.meters.items()}
        self._sink = ClickHouseSink(store)
        self._ids = itertools.count()

    def usage(self, customer: str, events: list[tuple[str, datetime, dict[str, Any]]]) -> None:
        """Store ``(meter slug, time, properties)`` events for ``customer``, as one worker flush
        (the commit point is one INSERT into usage_minute)."""
        table = WindowTable()
        for slug, when, props in events:
            meter = self.meters[slug]
            ev = EnvelopeEvent(
                id=f"e{next(self._ids)}",
                type=meter.event_type,
                customer=customer,
                time_ms=epoch_ms(when),
                properties=props,
            )
            contribution = self._compiled[slug].match(ev)
            assert contribution is not None, (slug, props)
            table.add(self.id, customer, ev.time_ms, ev.id, contribution)
        self._sink.commit("tally.events.test", [], table.rows(), {})


@pytest.fixture
def tenant(repo: Repo, store: Any) -> Tenant:
    return Tenant(repo, store, "acme")


@pytest.fixture
def other(repo: Repo, store: Any) -> Tenant:
    return Tenant(repo, store, "globex")
