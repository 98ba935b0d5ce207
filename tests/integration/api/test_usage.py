"""Usage queries (native + OpenMeter) over rows stored in a real chDB by the real sink."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from clickhouse.sink import NO_LATEST, ClickHouseSink
from schemas.meters import MeterSpec

from .conftest import auth

pytestmark = pytest.mark.anyio

T0 = datetime(2025, 1, 15, 10, 0, tzinfo=UTC)


def usage_row(
    meter_id: str, tenant_id: str, customer: str, minute: int, model: str, v: str
) -> tuple:
    value = Decimal(v)
    return (
        tenant_id,
        meter_id,
        customer,
        T0 + timedelta(minutes=minute),
        f'{{"model":"{model}"}}',
        "s",
        {"model": model},
        1,
        1,
        value,
        value,
        value,
        [v],
        NO_LATEST,
        0,
    )


@pytest.fixture
def seeded(repo: Any, store: Any, tenant: tuple[str, str]) -> str:
    """Meter 'tokens' (SUM by model) with usage for c1/c2 over two hours."""
    tenant_id = tenant[0]
    meter = repo.create_meter(
        tenant_id,
        MeterSpec.model_validate(
            {
                "slug": "tokens",
                "eventType": "llm",
                "aggregation": "SUM",
                "valueProperty": "$.tokens",
                "groupBy": {"model": "$.model"},
            }
        ),
    )
    rows = [
        usage_row(meter.id, tenant_id, "c1", 0, "a", "1.5"),
        usage_row(meter.id, tenant_id, "c1", 1, "b", "2"),
        usage_row(meter.id, tenant_id, "c2", 5, "a", "10"),
        usage_row(meter.id, tenant_id, "c1", 70, "a", "0.25"),  # 11:10, second hour
    ]
    ClickHouseSink(store).commit("t", [], rows, {0: 1})
    return tenant_id


RANGE = {"from": "2025-01-15T10:00:00Z", "to": "2025-01-15T12:00:00Z"}


async def test_native_total_and_windows(
    client: httpx.AsyncClient, tenant: tuple[str, str], seeded: str
) -> None:
    h = auth(tenant[1])
    r = await client.get("/v1/meters/tokens/usage", params=RANGE, headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["meter"] == "tokens" and body["window"] is None and body["tz"] == "UTC"
    assert body["from"] == "2025-01-15T10:00:00.000Z" and body["to"] == "2025-01-15T12:00:00.000Z"
    assert [(d["value"], d.get("customer")) for d in body["data"]] == [("13.75", None)]

    r = await client.get(
        "/v1/meters/tokens/usage",
        params={**RANGE, "window": "HOUR", "group_by": ["customer", "model"]},
        headers=h,
    )
    assert r.status_code == 200, r.text
    got = {
        (d["window_start"], d["customer"], d["group_by"]["model"]): d["value"]
        for d in r.json()["data"]
    }
    assert got == {
        ("2025-01-15T10:00:00.000Z", "c1", "a"): "1.5",
        ("2025-01-15T10:00:00.000Z", "c1", "b"): "2",
        ("2025-01-15T10:00:00.000Z", "c2", "a"): "10",
        ("2025-01-15T11:00:00.000Z", "c1", "a"): "0.25",
    }


async def test_native_filters_and_csv(
    client: httpx.AsyncClient, tenant: tuple[str, str], seeded: str
) -> None:
    h = auth(tenant[1])
    params = {**RANGE, "customer": "c1", "filter[model]": "a"}
    r = await client.get("/v1/meters/tokens/usage", params=params, headers=h)
    assert [(d["customer"], d["value"]) for d in r.json()["data"]] == [("c1", "1.75")]
    r = await client.get(
        "/v1/meters/tokens/usage",
        params={**RANGE, "window": "HOUR", "group_by": "model"},
        headers={**h, "Accept": "text/csv"},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["window_start", "window_end", "model", "value"]
    assert sorted(rows[1:]) == [
        ["2025-01-15T10:00:00.000Z", "2025-01-15T11:00:00.000Z", "a", "11.5"],
        ["2025-01-15T10:00:00.000Z", "2025-01-15T11:00:00.000Z", "b", "2"],
        ["2025-01-15T11:00:00.000Z", "2025-01-15T12:00:00.000Z", "a", "0.25"],
    ]
    r2 = await client.get(
        "/v1/meters/tokens/usage",
        params={**RANGE, "window": "HOUR", "group_by": "model", "format": "csv"},
        headers=h,
    )
    assert r2.text == r.text


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"window": "WEEK"}, "window"),
        ({"from": "nope"}, "from"),
        ({"from": "2025-01-15T12:00:00Z", "to": "2025-01-15T10:00:00Z"}, "from"),
        ({"tz": "Nowhere/Land"}, "tz"),
        ({"group_by": "colour"}, "group_by"),
        ({"filter[colour]": "x"}, "filter"),
        ({"from": "2025-01-15T10:00:30Z"}, "from"),
        ({"format": "xml"}, "format"),
    ],
)
async def test_native_bad_params(
    client: httpx.AsyncClient,
    tenant: tuple[str, str],
    seeded: str,
    params: dict[str, str],
    field: str,
) -> None:
    r = await client.get("/v1/meters/tokens/usage", params=params, headers=auth(tenant[1]))
    assert r.status_code == 400, r.text
    assert field in r.json()["message"]


async def test_unknown_meter_404(client: httpx.AsyncClient, tenant: tuple[str, str]) -> None:
    for path in ("/v1/meters/ghost/usage", "/api/v1/meters/ghost/query"):
        r = await client.get(path, headers=auth(tenant[1]))
        assert r.status_code == 404 and "ghost" in r.json()["message"]


async def test_cross_tenant_usage(
    client: httpx.AsyncClient, seeded: str, other_tenant: tuple[str, str], repo: Any
) -> None:
    """B has a meter with the same slug: B's query never sees A's usage."""
    repo.create_meter(
        other_tenant[0],
        MeterSpec.model_validate(
            {"slug": "tokens", "eventType": "llm", "aggregation": "SUM", "valueProperty": "$.t"}
        ),
    )
    r = await client.get("/v1/meters/tokens/usage", params=RANGE, headers=auth(other_tenant[1]))
    assert r.status_code == 200 and r.json()["data"] == []


async def test_openmeter_query_get_post_csv(
    client: httpx.AsyncClient, tenant: tuple[str, str], seeded: str
) -> None:
    h = auth(tenant[1])
    q = [
        ("from", "2025-01-15T10:00:00.000Z"),
        ("to", "2025-01-15T12:00:00.000Z"),
        ("windowSize", "HOUR"),
        ("subject", "c1"),
        ("groupBy", "model"),
        ("filterGroupBy[model]", "a"),
    ]
    r = await client.get("/api/v1/meters/tokens/query", params=q, headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["windowSize"] == "HOUR"
    assert body["from"] == "2025-01-15T10:00:00.000Z"
    assert body["data"] == [
        {
            "value": 1.5,
            "windowStart": "2025-01-15T10:00:00.000Z",
            "windowEnd": "2025-01-15T11:00:00.000Z",
            "subject": "c1",
            "groupBy": {"model": "a"},
        },
        {
            "value": 0.25,
            "windowStart": "2025-01-15T11:00:00.000Z",
            "windowEnd": "2025-01-15T12:00:00.000Z",
            "subject": "c1",
            "groupBy": {"model": "a"},
        },
    ]
    post = {
        "from": "2025-01-15T10:00:00Z",
        "to": "2025-01-15T12:00:00Z",
        "windowSize": "HOUR",
        "subject": ["c1"],
        "groupBy": ["model"],
        "filterGroupBy": {"model": ["a"]},
    }
    r2 = await client.post("/api/v1/meters/tokens/query", json=post, headers=h)
    assert r2.status_code == 200 and r2.json()["data"] == body["data"]
    # An optional body: zero bytes is the defaults; whitespace or JSON null is not a query.
    for raw, status in ((b"", 200), (b" \n", 400), (b"null", 400)):
        r = await client.post("/api/v1/meters/tokens/query", content=raw, headers=h)
        assert r.status_code == status, (raw, r.text)
        if status == 400:
            assert [d["field"] for d in r.json()["details"]] == ["body"], r.text
    r3 = await client.get(
        "/api/v1/meters/tokens/query", params=q, headers={**h, "Accept": "text/csv"}
    )
    rows = list(csv.reader(io.StringIO(r3.text)))
    assert rows == [
        ["window_start", "window_end", "subject", "model", "value"],
        ["2025-01-15T10:00:00.000Z", "2025-01-15T11:00:00.000Z", "c1", "a", "1.5"],
        ["2025-01-15T11:00:00.000Z", "2025-01-15T12:00:00.000Z", "c1", "a", "0.25"],
    ]
    r4 = await client.get(
        "/api/v1/meters/tokens/query",
        params=[("from", "2025-01-15T10:00:00Z"), ("to", "2025-01-15T12:00:00Z")],
        headers=h,
    )
    assert r4.json()["data"] == [
        {
            "value": 13.75,
            "windowStart": "2025-01-15T10:00:00.000Z",
            "windowEnd": "2025-01-15T12:00:00.000Z",
            "subject": None,
            "groupBy": {},
        }
    ]
    r5 = await client.get("/api/v1/meters/tokens/query", params=[("windowSize", "YEAR")], headers=h)
    assert r5.status_code == 400 and "windowSize" in r5.json()["message"]
    r6 = await client.post(
        "/api/v1/meters/tokens/query",
        content=b"{",
        headers={**h, "Content-Type": "application/json"},
    )
    assert r6.status_code == 400 and "JSON" in r6.json()["message"]
