"""The official OpenMeter SDK (openmeter==1.0.0b236), unmodified, against a real uvicorn server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from corehttp.exceptions import HttpResponseError
from openmeter import Client
from openmeter.models import Event, MeterQueryRequest

from api.app import create_app
from api.producer import EventProducer
from clickhouse.sink import NO_LATEST, ClickHouseSink
from runtime.broker import free_port
from schemas.meters import MeterSpec
from tally.settings import Settings

from .conftest import consume_all


class ServerThread:
    """uvicorn in a thread of this process (chDB allows one process per directory)."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def server(
    settings: Settings, store: Any, repo: Any, producer: EventProducer
) -> Iterator[ServerThread]:
    app = create_app(settings, store, producer=producer, progress_waiter=None, repo=repo)
    with ServerThread(app) as s:
        yield s


def test_sdk_ingest_reaches_topic(
    server: ServerThread, tenant: tuple[str, str], broker: Any, topic: str
) -> None:
    tenant_id, key = tenant
    client = Client(endpoint=server.url, token=key)
    now = datetime.now(UTC).replace(microsecond=123000)
    ev = Event(
        id="sdk-1",
        source="sdk-test",
        specversion="1.0",
        type="llm",
        subject="cust-9",
        time=now,
        data={"tokens": 42, "model": "gpt"},
    )
    assert client.events.ingest_event(ev) is None  # 204
    batch = [
        Event(id=f"sdk-b{i}", source="s", specversion="1.0", type="llm", subject="cust-9")
        for i in range(3)
    ]
    client.events.ingest_events(batch)
    client.events.ingest_events_json(
        Event(id="sdk-j", source="s", specversion="1.0", type="llm", subject="cust-8")
    )
    got = consume_all(broker.bootstrap, topic, 5)
    evs = {e.id: e for *_, env in got for e in env.events}
    assert sorted(evs) == ["sdk-1", "sdk-b0", "sdk-b1", "sdk-b2", "sdk-j"]
    assert all(env.tenant_id == tenant_id for *_, env in got)
    one = evs["sdk-1"]
    assert one.customer == "cust-9" and one.type == "llm"
    assert one.properties == {"tokens": 42, "model": "gpt"}
    assert one.time_ms == int(now.timestamp() * 1000)


def test_sdk_errors_are_raised(server: ServerThread, tenant: tuple[str, str]) -> None:
    bad = Client(endpoint=server.url, token="tly_wrong_key")
    ev = Event(id="x", source="s", specversion="1.0", type="t", subject="c")
    with pytest.raises(HttpResponseError) as ei:
        bad.events.ingest_event(ev)
    assert ei.value.status_code == 401
    good = Client(endpoint=server.url, token=tenant[1])
    old = Event(
        id="old",
        source="s",
        specversion="1.0",
        type="t",
        subject="c",
        time=datetime.now(UTC) - timedelta(days=400),
    )
    with pytest.raises(HttpResponseError) as ei:
        good.events.ingest_event(old)
    assert ei.value.status_code == 400
    assert "lateness" in ei.value.response.text()


def test_sdk_backs_off_on_429_and_raises_it_clearly(
    server: ServerThread, tenant: tuple[str, str], store: Any, broker: Any, topic: str
) -> None:
    """A rate-limited tenant (1 request per 10 s): the SDK's retry policy honours Retry-After and
    gets through; with retries off it raises HttpResponseError(429) whose body names the limit."""
    from clickhouse.limits import LimitOverrides, LimitsRepo

    tenant_id, key = tenant
    LimitsRepo(store).put(tenant_id, LimitOverrides(requests_per_second=0.1))
    client = Client(endpoint=server.url, token=key)
    for i in range(2):  # back to back: the 2nd is refused once, retried after Retry-After
        client.events.ingest_event(
            Event(id=f"rl-{i}", source="s", specversion="1.0", type="t", subject="c")
        )
    no_retry = Client(endpoint=server.url, token=key, retry_total=0)
    with pytest.raises(HttpResponseError) as ei:  # the bucket is empty again: refused
        no_retry.events.ingest_event(
            Event(id="nr", source="s", specversion="1.0", type="t", subject="c")
        )
    assert ei.value.status_code == 429
    assert int(ei.value.response.headers["Retry-After"]) >= 1
    assert ei.value.response.json()["details"][0]["field"] == "requests_per_second"
    metrics = httpx.get(server.url + "/metrics").text
    line = next(
        ln
        for ln in metrics.splitlines()
        if ln.startswith('tally_rate_limited_total{limit="requests_per_second"}')
    )
    assert float(line.split()[-1]) >= 2  # the SDK's retried refusal and the last one
    got = consume_all(broker.bootstrap, topic, 2)
    assert sorted(e.id for *_, env in got for e in env.events) == ["rl-0", "rl-1"]


def test_sdk_meters_and_query(
    server: ServerThread, tenant: tuple[str, str], repo: Any, store: Any
) -> None:
    tenant_id, key = tenant
    meter = repo.create_meter(
        tenant_id,
        MeterSpec.model_validate(
            {
                "slug": "calls",
                "eventType": "api",
                "aggregation": "COUNT",
                "groupBy": {"region": "$.region"},
            }
        ),
    )
    t0 = datetime(2025, 2, 1, 8, 0, tzinfo=UTC)
    rows = [
        (
            tenant_id,
            meter.id,
            cust,
            t0 + timedelta(minutes=m),
            f'{{"region":"{reg}"}}',
            "s",
            {"region": reg},
            n,
            0,
            0,
            None,
            None,
            [],
            NO_LATEST,
            0,
        )
        for cust, m, reg, n in [("a", 0, "eu", 3), ("a", 90, "us", 2), ("b", 30, "eu", 5)]
    ]
    ClickHouseSink(store).commit("t", [], rows, {})
    client = Client(endpoint=server.url, token=key)

    meters = client.meters.list()
    assert [m.slug for m in meters] == ["calls"]
    got = client.meters.get("calls")
    assert (
        got.aggregation == "COUNT"
        and got.event_type == "api"
        and got.group_by == {"region": "$.region"}
    )

    res = client.meters.query_json(
        "calls",
        from_parameter=t0,
        to=t0 + timedelta(hours=2),
        window_size="HOUR",
        subject=["a", "b"],
        group_by=["region"],
    )
    assert res.window_size == "HOUR"
    got_rows = sorted((r.subject, r.window_start, r.group_by["region"], r.value) for r in res.data)
    assert got_rows == [
        ("a", t0, "eu", 3.0),
        ("a", t0 + timedelta(hours=1), "us", 2.0),
        ("b", t0, "eu", 5.0),
    ]
    # the SDK sends filterGroupBy as a Python dict repr; it must still filter
    res = client.meters.query_json(
        "calls", from_parameter=t0, to=t0 + timedelta(hours=2), filter_group_by={"region": "eu"}
    )
    assert [r.value for r in res.data] == [8.0]
    assert res.data[0].window_start == t0 and res.data[0].window_end == t0 + timedelta(hours=2)

    res = client.meters.query(
        "calls",
        MeterQueryRequest(
            from_property=t0, to=t0 + timedelta(hours=2), subject=["b"], group_by=["subject"]
        ),
    )
    assert [(r.subject, r.value) for r in res.data] == [("b", 5.0)]

    text = client.meters.query_csv(
        "calls", from_parameter=t0, to=t0 + timedelta(hours=2), window_size="DAY"
    )
    assert text.splitlines() == [
        "window_start,window_end,value",
        "2025-02-01T00:00:00.000Z,2025-02-02T00:00:00.000Z,10",
    ]

    with pytest.raises(HttpResponseError) as ei:
        client.meters.query_json("nope")
    assert ei.value.status_code == 404


def test_metrics_and_probes_over_http(server: ServerThread) -> None:
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert httpx.get(server.url + "/readyz").status_code == 200
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and "tally_http_requests_total" in r.text
