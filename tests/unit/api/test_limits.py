"""Per-tenant limits and the monthly quota accounting of api.limits (fake clock, an in-memory
table standing in for the store's two tables; no I/O)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.limits import TenantLimiter, effective_limits, month_of, next_month
from clickhouse.limits import LimitOverrides
from tally.errors import Overloaded, PayloadTooLarge, QuotaExceeded, RateLimited
from tally.settings import Settings

T = "abcdefghijkl"


class Tables:
    """tenant_limits + tenant_monthly_events, in memory."""

    def __init__(self) -> None:
        self.limits: dict[str, LimitOverrides] = {}
        self.counts: dict[tuple[str, date], int] = {}
        self.reads = 0
        self.fail_next_write = False

    def get(self, tenant_id: str) -> LimitOverrides:
        self.reads += 1
        return self.limits.get(tenant_id, LimitOverrides())

    def put(self, tenant_id: str, o: LimitOverrides) -> None:
        self.limits[tenant_id] = o

    def month_totals(self, tenants: list[str], month: date) -> dict[str, int]:
        return {t: self.counts.get((t, month), 0) for t in tenants}

    def add_month_counts(self, counts: dict[tuple[str, date], int]) -> None:
        if self.fail_next_write:
            self.fail_next_write = False
            raise OSError("store down")
        for k, n in counts.items():
            self.counts[k] = self.counts.get(k, 0) + n


class State:
    async def run(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


class Clock:
    def __init__(self) -> None:
        self.t = 50.0
        self.wall = datetime(2026, 3, 31, 23, 59, 0, tzinfo=UTC)

    def __call__(self) -> float:
        return self.t


def make(tables: Tables, clock: Clock | None = None, **kw: Any) -> tuple[TenantLimiter, Clock]:
    clock = clock or Clock()
    s = Settings(max_events_per_request=1000, **kw)
    return TenantLimiter(s, tables, clock=clock, wallclock=lambda: clock.wall), clock  # type: ignore[arg-type]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_effective_limits_defaults_and_overrides() -> None:
    s = Settings(tenant_events_per_s=10, tenant_monthly_events=7)
    e = effective_limits(s, LimitOverrides())
    assert (e.events_per_second, e.max_batch_events, e.monthly_events) == (10, 0, 7)
    e = effective_limits(s, LimitOverrides(events_per_second=0, max_batch_events=9000))
    assert e.events_per_second == 0 and e.max_batch_events == 9000
    s = Settings(tenant_max_batch_events=300)
    assert effective_limits(s, LimitOverrides()).max_batch_events == 300
    assert effective_limits(s, LimitOverrides(max_batch_events=0)).max_batch_events == 0
    assert next_month(date(2026, 12, 1)) == datetime(2027, 1, 1, tzinfo=UTC)
    assert month_of(datetime(2026, 2, 28, 23, 59, tzinfo=UTC)) == date(2026, 2, 1)


def test_request_rate_is_a_token_bucket_with_retry_after() -> None:
    tables = Tables()
    tables.put(T, LimitOverrides(requests_per_second=2))
    lim, clock = make(tables)
    st_ = State()
    run(lim.charge_request(st_, T))  # type: ignore[arg-type]
    run(lim.charge_request(st_, T))  # type: ignore[arg-type]
    with pytest.raises(RateLimited) as ei:
        run(lim.charge_request(st_, T))  # type: ignore[arg-type]
    assert ei.value.status == 429 and ei.value.retry_after == 1
    assert ei.value.details[0]["field"] == "requests_per_second"
    clock.t += 0.5
    run(lim.charge_request(st_, T))  # type: ignore[arg-type]
    assert tables.reads == 1  # limits cached for limits_cache_ttl_s
    clock.t += 5
    run(lim.charge_request(st_, T))  # type: ignore[arg-type]
    assert tables.reads == 2


def test_api_replicas_divide_the_rates() -> None:
    tables = Tables()
    tables.put(T, LimitOverrides(events_per_second=100))
    lim, _ = make(tables, api_replicas=4, rate_limit_burst_s=1)
    st_ = State()
    r = run(lim.admit_events(st_, T, 25))  # type: ignore[arg-type]  # 25/s here, bucket of 25
    lim.commit(r, 25)
    with pytest.raises(RateLimited) as ei:
        run(lim.admit_events(st_, T, 25))  # type: ignore[arg-type]
    assert ei.value.details[0]["field"] == "events_per_second"


def test_batch_limit_is_413_and_inflight_events_503() -> None:
    tables = Tables()
    tables.put(T, LimitOverrides(max_batch_events=10, events_per_second=0))
    lim, _ = make(tables, max_inflight_events=15)
    st_ = State()
    with pytest.raises(PayloadTooLarge) as ei:
        run(lim.admit_events(st_, T, 11))  # type: ignore[arg-type]
    assert ei.value.details[0]["field"] == "max_batch_events"
    r = run(lim.admit_events(st_, T, 10))  # type: ignore[arg-type]
    with pytest.raises(Overloaded):
        run(lim.admit_events(st_, T, 10))  # type: ignore[arg-type]
    lim.release(r)
    lim.release(r)  # idempotent
    assert lim.inflight_events == 0
    run(lim.admit_events(st_, T, 10))  # type: ignore[arg-type]


def test_quota_counts_accepted_events_across_flushes_and_months() -> None:
    tables = Tables()
    tables.put(T, LimitOverrides(monthly_events=100, events_per_second=0))
    lim, clock = make(tables, quota_retry_after_max_s=300)
    st_ = State()
    r = run(lim.admit_events(st_, T, 60))  # type: ignore[arg-type]
    lim.commit(r, 50)  # 10 of them were invalid: only accepted events count
    r2 = run(lim.admit_events(st_, T, 40))  # type: ignore[arg-type]
    # in flight (reserved): 50 + 40 = 90; 11 more would exceed
    with pytest.raises(QuotaExceeded) as ei:
        run(lim.admit_events(st_, T, 11))  # type: ignore[arg-type]
    assert ei.value.details[0]["field"] == "monthly_events"
    assert ei.value.retry_after == 60  # the month ends in 60 s (capped at 300)
    lim.release(r2)  # the broker refused it: nothing counted
    run(lim.flush(st_))  # type: ignore[arg-type]
    assert tables.counts == {(T, date(2026, 3, 1)): 50}
    assert lim.month_estimate(T, date(2026, 3, 1)) == 50  # stored, not counted twice
    tables.fail_next_write = True
    r = run(lim.admit_events(st_, T, 50))  # type: ignore[arg-type]
    lim.commit(r, 50)
    run(lim.flush(st_))  # type: ignore[arg-type]  # fails: the counts are kept
    assert lim.month_estimate(T, date(2026, 3, 1)) == 100
    with pytest.raises(QuotaExceeded):
        run(lim.admit_events(st_, T, 1))  # type: ignore[arg-type]
    run(lim.flush(st_))  # type: ignore[arg-type]
    assert tables.counts == {(T, date(2026, 3, 1)): 100}
    clock.wall = datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC)  # a new month: a new quota
    r = run(lim.admit_events(st_, T, 100))  # type: ignore[arg-type]
    lim.commit(r, 100)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 1), st.sampled_from(["ingest", "flush"]), st.integers(1, 30)),
        max_size=60,
    )
)
def test_two_processes_overshoot_at_most_what_the_other_had_not_flushed(
    ops: list[tuple[int, str, int]],
) -> None:
    """Two API processes share a quota: the total accepted never exceeds it by more than what
    the other process accepted after the last time this one read the stored total."""
    tables = Tables()
    quota = 200
    tables.put(T, LimitOverrides(monthly_events=quota, events_per_second=0))
    clock = Clock()
    procs = [make(tables, clock)[0], make(tables, clock)[0]]
    st_ = State()
    month = date(2026, 3, 1)
    acc = [0, 0]  # accepted by each process
    flushed = [0, 0]  # accepted by each, as of its last successful flush
    seen = [0, 0]  # the other's flushed count when this one last read the total
    for who, op, n in ops:
        lim = procs[who]
        if op == "flush":
            run(lim.flush(st_))  # type: ignore[arg-type]
            flushed[who] = acc[who]
            if (T, month) in lim.stored:
                seen[who] = flushed[1 - who]
            continue
        first_read = (T, month) not in lim.stored
        try:
            r = run(lim.admit_events(st_, T, n))  # type: ignore[arg-type]
        except QuotaExceeded:
            continue
        finally:
            if first_read and (T, month) in lim.stored:
                seen[who] = flushed[1 - who]
        lim.commit(r, n)
        acc[who] += n
        assert sum(acc) <= quota + (acc[1 - who] - seen[who])
    assert sum(acc) <= quota + max(acc)
    for lim in procs:
        run(lim.flush(st_))  # type: ignore[arg-type]
    assert tables.counts.get((T, month), 0) == sum(acc)


class ManyTables(Tables):
    """Tables with the batched read of ``TenantLimiter.refresh``."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    def get_many(self, tenant_ids: list[str]) -> dict[str, LimitOverrides]:
        self.batches.append(sorted(tenant_ids))
        return {t: self.limits.get(t, LimitOverrides()) for t in tenant_ids}


def test_limits_in_use_are_reread_in_the_background_in_one_read() -> None:
    tables = ManyTables()
    tables.put(T, LimitOverrides(requests_per_second=100))
    lim, clock = make(tables, limits_cache_ttl_s=4)
    st_ = State()
    other = "mnopqrstuvwx"
    run(lim.charge_request(st_, T))  # type: ignore[arg-type]
    run(lim.charge_request(st_, other))  # type: ignore[arg-type]
    assert tables.reads == 2
    assert run(lim.refresh(st_, keep_warm_s=60)) == 0  # young: nothing read  # type: ignore[arg-type]
    clock.t += 2.5
    run(lim.charge_request(st_, T))  # type: ignore[arg-type]
    tables.put(T, LimitOverrides(requests_per_second=1))  # changed in another process
    # other was last used 2.5 s ago: outside a 2 s window, not read (and forgotten)
    assert run(lim.refresh(st_, keep_warm_s=2)) == 1  # type: ignore[arg-type]
    assert tables.batches == [[T]]
    clock.t += 3  # past the first TTL, within the renewed one: no read, the new limit applies
    run(lim.charge_request(st_, T))  # type: ignore[arg-type]
    with pytest.raises(RateLimited):
        run(lim.charge_request(st_, T))  # type: ignore[arg-type]
    assert tables.reads == 2
    run(lim.charge_request(st_, other))  # its entry ran out: read on use
    assert tables.reads == 3


def test_a_limits_refresh_across_an_invalidation_keeps_nothing() -> None:
    tables = ManyTables()
    lim, clock = make(tables, limits_cache_ttl_s=4)
    st_ = State()
    run(lim.charge_request(st_, T))  # type: ignore[arg-type]
    clock.t += 2.5

    class Racing(State):
        async def run(self, fn: Any, *args: Any) -> Any:
            out = fn(*args)
            lim.invalidate(T)  # the limits were changed through this process meanwhile
            tables.put(T, LimitOverrides(requests_per_second=1))
            return out

    assert run(lim.refresh(Racing(), keep_warm_s=60)) == 0  # type: ignore[arg-type]
    run(lim.charge_request(st_, T))  # type: ignore[arg-type]
    assert tables.reads == 2  # read on use, the new limit applies
    with pytest.raises(RateLimited):
        run(lim.charge_request(st_, T))  # type: ignore[arg-type]
