"""Token buckets and the bounded TTL cache (pure, driven by a fake clock)."""

from __future__ import annotations

import asyncio
import math

from hypothesis import given
from hypothesis import strategies as st

from api.ratelimit import Hit, KeyedBuckets, TokenBucket, TTLCache, retry_after_s


@given(
    rate=st.floats(0.5, 1000),
    capacity=st.floats(1, 5000),
    steps=st.lists(st.tuples(st.floats(0, 3), st.integers(1, 200)), max_size=80),
)
def test_a_bucket_never_gives_more_than_capacity_plus_rate_times_time(
    rate: float, capacity: float, steps: list[tuple[float, int]]
) -> None:
    now = 100.0
    b = TokenBucket(rate, capacity, now)
    taken = 0
    start = now
    for dt, n in steps:
        now += dt
        wait = b.take(n, now)
        if wait == 0:
            taken += n
        else:
            assert wait > 0
            # the announced wait is enough: after it, the same request passes
            probe = TokenBucket(rate, capacity, now)
            probe.tokens = b.tokens
            assert n > capacity or probe.take(n, now + wait + 1e-6) == 0
    assert taken <= capacity + rate * (now - start) + 1e-6


@given(
    rate=st.floats(0.5, 1000),
    capacity=st.floats(1, 500),
    steps=st.lists(st.tuples(st.floats(0, 3), st.integers(1, 2000)), max_size=80),
)
def test_with_debt_a_big_batch_passes_and_the_rate_still_holds(
    rate: float, capacity: float, steps: list[tuple[float, int]]
) -> None:
    now = 0.0
    b = TokenBucket(rate, capacity, now)
    taken = 0
    for dt, n in steps:
        now += dt
        wait = b.take(n, now, debt=True)
        if wait == 0:
            taken += n
        else:
            assert b.take(n, now + wait + 1e-6, debt=True) == 0  # the announced wait suffices
            now += wait + 1e-6
            taken += n
    biggest = max((n for _dt, n in steps), default=0)
    assert taken <= capacity + rate * now + biggest + 1e-6


def test_bucket_refill_and_retry_after() -> None:
    b = TokenBucket(10, 10, 0.0)
    assert b.take(10, 0.0) == 0
    assert math.isclose(b.take(5, 0.0), 0.5)
    assert b.take(5, 0.5) == 0
    assert retry_after_s(0.01) == 1 and retry_after_s(2.2) == 3 and retry_after_s(math.inf) == 3600
    b.reconfigure(1, 2, 0.5)
    assert b.take(3, 100.0) > 0 and b.take(2, 100.0) == 0


def test_keyed_buckets_are_bounded_and_least_recently_used_goes_first() -> None:
    kb: KeyedBuckets[str] = KeyedBuckets(3)
    for k in "abc":
        kb.bucket(k, 1, 1, 0).take(1, 0)
    kb.bucket("a", 1, 1, 0)  # a is used again
    kb.bucket("d", 1, 1, 0)  # b is dropped
    assert len(kb) == 3
    assert kb.bucket("a", 1, 1, 0).take(1, 0) > 0  # still empty: a was kept
    assert kb.bucket("b", 1, 1, 0).take(1, 0) == 0  # b came back full


def test_ttl_cache_fresh_stale_miss_and_bound() -> None:
    c: TTLCache[str, int] = TTLCache(2)
    c.put("a", 1, ttl=5, now=0)
    assert c.get("a", 4.9) == (Hit.FRESH, 1)
    assert c.get("a", 5.0) == (Hit.STALE, 1)
    assert c.get("b", 0) == (Hit.MISS, None)
    c.put("b", 2, 5, 0)
    c.get("a", 0)
    c.put("c", 3, 5, 0)  # b (least recently used) is dropped
    assert c.get("b", 0)[0] is Hit.MISS and len(c) == 2
    assert c.drop_where(lambda v: v == 3) == 1 and c.get("c", 0)[0] is Hit.MISS


def test_ttl_cache_due_entries_in_use_are_renewed_without_counting_as_a_use() -> None:
    c: TTLCache[str, int] = TTLCache(4)
    c.put("used", 1, ttl=4, now=0)
    c.put("idle", 2, ttl=4, now=0)
    c.put("young", 3, ttl=4, now=2.5)
    c.get("used", 2.5)
    # at 3: used and idle have 1 s left, young 3.5 s; idle was last touched at 0
    assert c.due(3, ahead_s=2, used_since=1) == [("used", 1)]
    assert c.due(3, ahead_s=2, used_since=0) == [("idle", 2), ("used", 1)]
    assert c.due(9, ahead_s=2, used_since=1) == [("young", 3), ("used", 1)]  # stale ones too
    assert c.renew("used", 10, ttl=4, now=3)
    assert c.get("used", 6.9) == (Hit.FRESH, 10) and c.get("used", 7.0) == (Hit.STALE, 10)
    # a renewal is not a use: the entry's use time (and LRU place) stay as they were
    c.put("x", 4, 4, 3)
    assert c.renew("idle", 20, 4, 3)
    c.put("y", 5, 4, 3)  # idle is still the least recently used: dropped
    assert c.get("idle", 3)[0] is Hit.MISS
    assert not c.renew("idle", 30, 4, 3) and c.get("idle", 3)[0] is Hit.MISS  # not added back
    # the gets at 6.9 and 7.0 were uses; x and y were put (used) at 3
    assert c.due(7.5, ahead_s=5, used_since=7) == [("used", 10)]
    assert c.due(7.5, ahead_s=5, used_since=7.1) == []


def test_renewal_reads_every_entry_in_use_once_one_is_due() -> None:
    """The entries in use are renewed together once one of them is past half its TTL, so they
    share one schedule: later rounds read them in one go, not one entry per round."""
    c: TTLCache[str, int] = TTLCache(8)
    ttl, window = 4.0, 10.0
    for i, key in enumerate(["a", "b", "c", "d"]):
        c.put(key, i, ttl=ttl, now=i * 0.5)  # deadlines 4, 4.5, 5, 5.5
    c.put("idle", 9, ttl=ttl, now=-20)  # last used outside the window: never read
    reads: list[list[str]] = []

    async def read(due: list[tuple[str, int]]) -> dict[str, int]:
        reads.append(sorted(k for k, _v in due))
        return {k: v + 100 for k, v in due if k != "c"}  # c is gone from the store

    def round_at(now: float) -> tuple[int, list[str]]:
        return asyncio.run(c.renew_due(ttl, window, now, read, lambda: 0))

    assert round_at(1.9) == (0, [])  # nothing past half its TTL yet: no read at all
    assert reads == []
    assert round_at(2.1) == (3, ["c"])  # a is due: a, b, c and d are read together
    assert reads == [["a", "b", "c", "d"]]
    assert c.get("b", 2.2) == (Hit.FRESH, 101)
    assert c.get("d", 6.0) == (Hit.FRESH, 103)  # renewed from 2.1: fresh until 6.1
    c.pop("c")  # the caller drops what the store no longer has
    for now in (2.6, 3.1, 3.6, 4.0):  # a, b, d share a deadline (6.1): no read until 4.1
        assert round_at(now) == (0, [])
    assert round_at(4.2) == (3, [])
    assert reads == [["a", "b", "c", "d"], ["a", "b", "d"]]
    # an entry changed meanwhile (generation moved during the read): nothing is kept
    gen = iter([0, 1])
    assert asyncio.run(c.renew_due(ttl, window, 6.5, read, lambda: next(gen))) == (0, [])
    assert c.get("a", 6.6)[1] == 200  # still the value renewed at 4.2
