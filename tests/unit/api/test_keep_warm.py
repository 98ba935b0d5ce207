"""``AppState.refresh_caches``: each cache's background round, its metric, and a failing store
logged once per streak (no I/O: the caches are stand-ins)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from api.state import AppState, Metrics
from tally.settings import Settings


class Cache:
    def __init__(self, renewed: int) -> None:
        self.renewed = renewed
        self.fail = False
        self.calls: list[float] = []

    async def refresh(self, *args: Any) -> int:
        self.calls.append(args[-1])  # keep_warm_s
        if self.fail:
            raise OSError("store unavailable")
        return self.renewed


def test_each_round_renews_every_cache_counts_them_and_logs_a_failing_store_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = Settings(cache_keep_warm_s=120, meter_cache_ttl_s=2, auth_positive_ttl_s=5)
    st = AppState(settings=s, store=None, repo=None, producer=None, progress_waiter=None)
    st.metrics = Metrics(settings=s)
    st.auth, st.meters, st.limiter = Cache(2), Cache(3), Cache(0)
    assert st.keep_warm_period_s() == 0.5  # a quarter of the shortest TTL

    def count(cache: str) -> float:
        v = st.metrics.registry.get_sample_value("tally_cache_renewals_total", {"cache": cache})
        return float(v or 0)

    caplog.set_level(logging.DEBUG, logger="api.state")
    asyncio.run(st.refresh_caches())
    assert (count("keys"), count("meters"), count("limits")) == (2, 3, 0)
    assert st.auth.calls == [120] and st.limiter.calls == [120]
    st.meters.fail = True
    for _ in range(3):
        asyncio.run(st.refresh_caches())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "meters" in warnings[0].getMessage()
    assert (count("keys"), count("meters")) == (8, 3)  # the other caches went on
    st.meters.fail = False
    asyncio.run(st.refresh_caches())
    assert count("meters") == 6
    assert any("works again" in r.getMessage() for r in caplog.records)
