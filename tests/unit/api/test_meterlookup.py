"""The usage queries' meter cache (api.meterlookup): bounded staleness, no kept misses, and the
meter's ``stream_only`` fact kept and forgotten with it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from api.meterlookup import MeterLookup
from schemas.meters import Aggregation, Meter
from schemas.usage import UsageMeter
from tally.errors import NotFound


def _meter(mid: str, aggregation: Aggregation = Aggregation.SUM) -> Meter:
    return Meter.model_validate(
        {
            "id": mid,
            "tenant_id": "t1",
            "slug": "tokens",
            "event_type": "llm",
            "aggregation": aggregation,
            "value_property": "$.tokens",
            "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        }
    )


class Store:
    """What the store holds, and how often it was asked."""

    def __init__(self) -> None:
        self.meter: Meter | None = _meter("m1")
        self.stream_only = True  # no backfill run, no correction
        self.calls = 0
        self.gate: asyncio.Event | None = None  # set: an answer waits for it after the read

    async def lookup(self, tenant_id: str, slug: str) -> UsageMeter:
        self.calls += 1
        meter, stream_only = self.meter, self.stream_only
        await asyncio.sleep(0)
        if self.gate is not None:
            await self.gate.wait()
        if meter is None:
            raise NotFound(f"meter {slug!r} not found", field="slug")
        return UsageMeter(meter.model_copy(update={"tenant_id": tenant_id}), stream_only)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _cache() -> tuple[Store, Clock, MeterLookup]:
    """A store holding meter m1, a clock, and a 2 s cache on that clock."""
    store, clock = Store(), Clock()
    return store, clock, MeterLookup(store.lookup, 2.0, clock=clock)


def test_a_fresh_entry_answers_and_an_old_one_is_looked_up_again() -> None:
    store, clock, cache = _cache()

    async def go() -> None:
        assert (await cache.get("t1", "tokens")).meter.id == "m1"
        clock.now += 1.9
        assert (await cache.get("t1", "tokens")).meter.id == "m1"
        assert store.calls == 1
        store.meter = _meter("m2", Aggregation.MAX)  # deleted and created again elsewhere
        clock.now += 0.2  # past the TTL of the first lookup
        assert (await cache.get("t1", "tokens")).meter.id == "m2"
        assert store.calls == 2
        # another tenant's slug is another entry
        await cache.get("t2", "tokens")
        assert store.calls == 3

    asyncio.run(go())


def test_a_miss_is_never_kept_and_drops_the_entry() -> None:
    store, clock, cache = _cache()

    async def go() -> None:
        await cache.get("t1", "tokens")
        clock.now += 5
        store.meter = None
        with pytest.raises(NotFound):
            await cache.get("t1", "tokens")
        with pytest.raises(NotFound):
            await cache.get("t1", "tokens")
        assert store.calls == 3
        store.meter = _meter("m3")  # created: found at once
        assert (await cache.get("t1", "tokens")).meter.id == "m3"

    asyncio.run(go())


def test_forget_drops_the_entry_and_a_lookup_in_flight_does_not_keep_its_answer() -> None:
    store, _clock, cache = _cache()

    async def go() -> None:
        await cache.get("t1", "tokens")
        cache.forget("t1", "tokens")
        await cache.get("t1", "tokens")
        assert store.calls == 2
        # a lookup that read the old meter before a delete through this process finished
        gate = asyncio.Event()
        store.meter, store.gate = _meter("old"), gate
        cache.forget("t1", "tokens")
        task = asyncio.create_task(cache.get("t1", "tokens"))
        await asyncio.sleep(0)
        cache.forget("t1", "tokens")  # the delete
        store.meter, store.gate = _meter("new"), None
        gate.set()
        assert (await task).meter.id == "old"  # its own caller gets what it read
        assert (await cache.get("t1", "tokens")).meter.id == "new"

    asyncio.run(go())


def test_a_ttl_of_zero_asks_every_time() -> None:
    store = Store()
    cache = MeterLookup(store.lookup, 0)

    async def go() -> None:
        for _ in range(3):
            await cache.get("t1", "tokens")

    asyncio.run(go())
    assert store.calls == 3


class Many:
    """The store's live meters per tenant for ``MeterLookup.refresh``; counts its reads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reads: list[list[str]] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, tenant_ids: list[str]) -> list[UsageMeter]:
        self.reads.append(tenant_ids)
        meter, stream_only = self.store.meter, self.store.stream_only
        if self.gate is not None:
            await self.gate.wait()
        if meter is None:
            return []
        return [
            UsageMeter(meter.model_copy(update={"tenant_id": t}), stream_only) for t in tenant_ids
        ]


def test_refresh_keeps_entries_in_use_fresh_and_never_serves_one_past_its_ttl() -> None:
    store, clock, cache = _cache()
    many = Many(store)

    async def go() -> None:
        await cache.get("t1", "tokens")
        await cache.get("t2", "tokens")
        assert await cache.refresh(many, keep_warm_s=60) == 0  # young entries: nothing read
        clock.now += 1.5  # past half the TTL
        await cache.get("t1", "tokens")  # t1 in use; t2 was used 1.5 s ago, still in the window
        assert await cache.refresh(many, keep_warm_s=60) == 2 and many.reads == [["t1", "t2"]]
        clock.now += 1.9  # 3.4 s after the first lookup, 1.9 s after the renewal
        assert (await cache.get("t1", "tokens")).meter.id == "m1" and store.calls == 2
        # idle longer than the window: not read again, looked up on its next use
        clock.now += 1.0
        assert await cache.refresh(many, keep_warm_s=1.5) == 1 and many.reads[-1] == ["t1"]
        await cache.get("t2", "tokens")
        assert store.calls == 3
        # deleted elsewhere: the renewal drops the entry, the next query asks (404)
        clock.now += 1.5
        store.meter = None
        await cache.refresh(many, keep_warm_s=60)
        with pytest.raises(NotFound):
            await cache.get("t1", "tokens")
        assert store.calls == 4

    asyncio.run(go())


def test_a_refresh_across_a_forget_keeps_nothing() -> None:
    store, clock, cache = _cache()
    many = Many(store)

    async def go() -> None:
        await cache.get("t1", "tokens")
        clock.now += 1.5
        many.gate = asyncio.Event()
        task = asyncio.create_task(cache.refresh(many, keep_warm_s=60))
        await asyncio.sleep(0)
        cache.forget("t1", "tokens")  # deleted through this process while the read was out
        store.meter = _meter("new")
        many.gate.set()
        assert await task == 0
        assert (await cache.get("t1", "tokens")).meter.id == "new" and store.calls == 2

    asyncio.run(go())


def test_forget_tenant_drops_that_tenants_meters_and_a_lookup_in_flight_keeps_nothing() -> None:
    store, _clock, cache = _cache()

    async def go() -> None:
        await cache.get("t1", "tokens")
        await cache.get("t1", "calls")
        await cache.get("t2", "tokens")
        assert store.calls == 3
        assert (await cache.get("t1", "tokens")).stream_only is True
        # an event of t1 corrected through this process: every meter of t1 is asked again
        store.stream_only = False
        cache.forget_tenant("t1")
        assert (await cache.get("t1", "tokens")).stream_only is False
        assert (await cache.get("t1", "calls")).stream_only is False
        assert store.calls == 5
        assert (await cache.get("t2", "tokens")).stream_only is True  # other tenants kept
        assert store.calls == 5
        # a lookup that read "stream only" before the correction finished keeps nothing
        store.stream_only, store.gate = True, asyncio.Event()
        cache.forget_tenant("t1")
        task = asyncio.create_task(cache.get("t1", "tokens"))
        await asyncio.sleep(0)
        cache.forget_tenant("t1")  # the correction
        gate, store.gate, store.stream_only = store.gate, None, False
        gate.set()
        assert (await task).stream_only is True  # its own caller gets what it read
        assert (await cache.get("t1", "tokens")).stream_only is False
        assert store.calls == 7

    asyncio.run(go())


def test_refresh_carries_a_change_of_stream_only_made_elsewhere() -> None:
    store, clock, cache = _cache()
    many = Many(store)

    async def go() -> None:
        assert (await cache.get("t1", "tokens")).stream_only is True
        clock.now += 1.5
        store.stream_only = False  # a correction or a backfill run through another process
        assert await cache.refresh(many, keep_warm_s=60) == 1
        assert (await cache.get("t1", "tokens")).stream_only is False
        assert store.calls == 1  # from the renewal, not a lookup

    asyncio.run(go())
