"""The meter of a usage query, by (tenant, slug), kept for ``meter_cache_ttl_s`` per API process.

A usage query needs its meter (id, aggregation, group_by) before it can build its SQL. Looking
it up in the store was one more round trip per query: ~7 ms of a ~33 ms customer x month query
in `tally run` (the API child asks the main process, which owns the store). With the meter comes
whether the stream's rows alone answer its queries (``schemas.usage.UsageMeter.stream_only``: no
complete backfill run, no event correction), which spares each query the statement asking it.
The bounds (docs/operations.md, "How fast a meter change takes effect"):

- a meter created anywhere is found at once: a miss (404) is never kept;
- a meter deleted through this process is forgotten at once; so are the tenant's meters after
  an event correction through this process (``forget_tenant``: a correction may touch any of
  them), and a meter whose backfill ran through this process;
- a meter deleted (or deleted and created again with the same slug) through another API
  process: this one may answer usage queries with the old definition for ``meter_cache_ttl_s``
  more (2 s by default, the interval at which the stream worker reloads its meters); likewise a
  correction or a completed backfill run made elsewhere shows within ``meter_cache_ttl_s``.

A meter's definition never changes in place (a different spec is a conflict: delete, then
create), so an entry is either current or of a deleted meter. ``0`` turns the cache off.

Entries in use are kept fresh in the background (``refresh``, run by ``AppState.keep_warm``):
the meters of every tenant whose cached meters were used in the last ``cache_keep_warm_s``
are read again in one statement once one entry is past half its TTL (``TTLCache.renew_due``),
so a query every few seconds does not wait for the store each time its meter's entry runs out.
An entry is still never served longer than ``ttl_s`` after the store last confirmed it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from api.ratelimit import Hit, TTLCache
from schemas.usage import UsageMeter

Lookup = Callable[[str, str], Awaitable[UsageMeter]]
LookupMany = Callable[[list[str]], Awaitable[list[UsageMeter]]]  # tenant ids -> live meters


class MeterLookup:
    """(tenant, slug) -> UsageMeter from ``lookup`` (the store), kept ``ttl_s`` seconds, at most
    ``max_entries`` (LRU)."""

    def __init__(
        self,
        lookup: Lookup,
        ttl_s: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self.ttl_s = ttl_s
        self._clock = clock
        self._cache: TTLCache[tuple[str, str], UsageMeter] = TTLCache(max_entries)
        self._forgets = 0  # a lookup in flight across a ``forget`` does not keep its answer

    async def get(self, tenant_id: str, slug: str) -> UsageMeter:
        """The meter, from the cache while fresh, else from the lookup (its NotFound passes
        through, and drops any entry kept for the slug)."""
        if self.ttl_s <= 0:
            return await self._lookup(tenant_id, slug)
        key = (tenant_id, slug)
        hit, meter = self._cache.get(key, self._clock())
        if hit is Hit.FRESH and meter is not None:
            return meter
        forgets = self._forgets
        try:
            meter = await self._lookup(tenant_id, slug)
        except Exception:
            self._cache.pop(key)
            raise
        if forgets == self._forgets:
            self._cache.put(key, meter, self.ttl_s, self._clock())
        return meter

    async def refresh(self, lookup_many: LookupMany, keep_warm_s: float) -> int:
        """Re-read the entries used in the last ``keep_warm_s``, once one is past half its TTL
        (one read for all their tenants; ``TTLCache.renew_due``); renew those still live, drop
        the others. Returns how many entries were renewed."""
        if self.ttl_s <= 0:
            return 0

        async def read(
            due: list[tuple[tuple[str, str], UsageMeter]],
        ) -> dict[tuple[str, str], UsageMeter]:
            found = await lookup_many(sorted({tenant for (tenant, _slug), _m in due}))
            return {(u.meter.tenant_id, u.meter.slug): u for u in found}

        renewed, gone = await self._cache.renew_due(
            self.ttl_s, keep_warm_s, self._clock(), read, lambda: self._forgets
        )
        for key in gone:
            self._cache.pop(key)
        return renewed

    def forget(self, tenant_id: str, slug: str) -> None:
        """The meter was deleted, activated or backfilled through this process: ask the store
        next time."""
        self._forgets += 1
        self._cache.pop((tenant_id, slug))

    def forget_tenant(self, tenant_id: str) -> None:
        """An event of the tenant was corrected through this process: any of its meters may
        now need the corrections in its answers, so ask the store next time for each."""
        self._forgets += 1
        self._cache.drop_where(lambda u: u.meter.tenant_id == tenant_id)
