"""The API's caches kept warm in the background (``cache_keep_warm_s``), on a real store and
broker: a key, meter and limits in use are re-read before their TTL ends, so the requests using
them stop waiting for the store; the staleness bounds are unchanged. Two apps on one store stand
for two API processes; app A runs its lifespan (the background task), B is where changes are
made."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from api.producer import EventProducer
from clickhouse.limits import LimitOverrides, LimitsRepo
from clickhouse.repo import Repo
from tests.integration.clickhouse.groundtruth import correction_row

from .conftest import auth
from .test_keys import TTL, http, two_apps

pytestmark = pytest.mark.anyio

METER_TTL = 0.8  # keys and limits: test_keys.TTL


def _sample(app: Any, name: str, **labels: str) -> float:
    value = app.state.tally.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


async def _until(pred: Any, bound_s: float) -> float:
    """Seconds until ``pred()`` (async) is true; fails past ``bound_s``."""
    started = time.monotonic()
    while not await pred():
        assert time.monotonic() - started < bound_s, "not within the bound"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_key_meter_and_limits_in_use_stay_fresh_and_changes_still_arrive_in_time(
    broker: Any,
    topic: str,
    store: Any,
    repo: Repo,
    producer: EventProducer,
    tenant: tuple[str, str],
) -> None:
    tenant_id, key = tenant
    app_a, app_b = two_apps(
        broker,
        topic,
        store,
        repo,
        producer,
        limits_cache_ttl_s=TTL,
        meter_cache_ttl_s=METER_TTL,
        cache_keep_warm_s=30,
    )
    async with app_a.router.lifespan_context(app_a), http(app_a) as a, http(app_b) as b:
        r = await b.post(
            "/v1/meters",
            json={"slug": "calls", "event_type": "api", "aggregation": "count"},
            headers=auth(key),
        )
        assert r.status_code == 201, r.text

        async def usage() -> int:
            return (await a.get("/v1/meters/calls/usage", headers=auth(key))).status_code

        # used every 0.3 s for 4 TTLs: only the first request looked the key up in the store
        for _ in range(14):
            assert await usage() == 200
            await asyncio.sleep(0.3)
        assert _sample(app_a, "tally_auth_store_lookups_total", kind="k") == 1
        for cache in ("keys", "meters", "limits"):
            assert _sample(app_a, "tally_cache_renewals_total", cache=cache) >= 3, cache

        # a correction made elsewhere (an effect row written straight to the store) shows
        # within the meter's TTL, though the entry in use said "the stream alone answers"
        minute = datetime.now(UTC).replace(second=0, microsecond=0)
        correction_row(store, tenant_id, repo.get_meter(tenant_id, "calls").id, 1, minute, "c-fix")
        window = {
            "customer": "c-fix",
            "from": (minute - timedelta(hours=1)).isoformat(),
            "to": (minute + timedelta(hours=1)).isoformat(),
        }

        async def corrected() -> bool:
            r = await a.get("/v1/meters/calls/usage", params=window, headers=auth(key))
            assert r.status_code == 200, r.text
            return [row["value"] for row in r.json()["data"]] == ["1"]

        await _until(corrected, METER_TTL + 1.0)

        # a limit changed elsewhere applies within the TTL, with the background re-reads on
        LimitsRepo(store).put(tenant_id, LimitOverrides(requests_per_second=0.5))

        async def limited() -> bool:
            return (await usage()) == 429

        await _until(limited, TTL + 1.0)

        # so does a meter deleted elsewhere (404), and a key revoked elsewhere (401)
        LimitsRepo(store).put(tenant_id, LimitOverrides())
        await asyncio.sleep(TTL + 0.2)
        assert await usage() == 200
        assert (await b.delete("/v1/meters/calls", headers=auth(key))).status_code == 204

        async def gone() -> bool:
            return (await usage()) == 404

        await _until(gone, METER_TTL + 1.0)
        key_id = (await b.get("/v1/api-keys", headers=auth(key))).json()["data"][0]["id"]
        assert (await b.delete(f"/v1/api-keys/{key_id}", headers=auth(key))).status_code == 200

        async def refused() -> bool:
            return (await a.get("/v1/meters", headers=auth(key))).status_code == 401

        await _until(refused, TTL + 1.0)
