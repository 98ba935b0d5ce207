"""Pure, in-process building blocks: token buckets and a bounded TTL cache (no I/O, no clock of
their own: every call takes ``now``, so tests drive them with a fake clock).

- ``TokenBucket``: ``rate`` tokens per second, at most ``capacity`` saved up. ``take(n, now)``
  returns 0.0 when the tokens were taken, else the seconds to wait until they would be there
  (nothing is taken then). With ``debt=True`` a request larger than the capacity can pass.
- ``KeyedBuckets``: one bucket per key (client address, tenant), at most ``max_keys`` of them;
  the least recently used bucket is dropped first (it comes back full: documented bound).
- ``TTLCache``: at most ``max_entries`` values, least recently used dropped first. ``get`` tells
  a fresh hit from a stale one (past its TTL, still remembered) and a miss; ``due``/``renew``
  let a background task re-confirm the entries in use before their TTL ends.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from enum import Enum
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TokenBucket:
    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.tokens = float(capacity)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def reconfigure(self, rate: float, capacity: float, now: float) -> None:
        """A changed limit; a bigger bucket gets the difference at once (a raised limit
        applies immediately), a smaller one is cut to its new size."""
        self._refill(now)
        grown = max(0.0, float(capacity) - self.capacity)
        self.rate = float(rate)
        self.capacity = float(capacity)
        self.tokens = min(self.tokens + grown, self.capacity)

    def available(self, now: float) -> float:
        self._refill(now)
        return self.tokens

    def take(self, n: float, now: float, *, debt: bool = False) -> float:
        """Take ``n`` tokens: 0.0, or the wait in seconds until they would be available.

        ``debt=True``: ``n`` may exceed the capacity (a batch larger than the burst): the request
        passes once ``min(n, capacity)`` tokens are there and the bucket goes negative, so the
        long-run rate still holds (at most ``capacity + rate * t + n`` in any ``t`` seconds).
        """
        self._refill(now)
        need = min(n, self.capacity) if debt else n
        if self.tokens >= need:
            self.tokens -= n
            return 0.0
        if self.rate <= 0:
            return math.inf
        return (need - self.tokens) / self.rate


def retry_after_s(wait: float) -> int:
    """A wait in seconds as a ``Retry-After`` value (whole seconds, at least 1)."""
    if math.isinf(wait):
        return 3600
    return max(1, math.ceil(wait))


class KeyedBuckets(Generic[K]):
    """A bounded map key -> TokenBucket (LRU eviction)."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._buckets: OrderedDict[K, TokenBucket] = OrderedDict()

    def bucket(self, key: K, rate: float, capacity: float, now: float) -> TokenBucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = TokenBucket(rate, capacity, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            if b.rate != rate or b.capacity != capacity:
                b.reconfigure(rate, capacity, now)
        return b

    def __len__(self) -> int:
        return len(self._buckets)


class Hit(Enum):
    MISS = 0
    FRESH = 1
    STALE = 2


class TTLCache(Generic[K, V]):
    """A bounded LRU map with a per-entry deadline. Each entry also remembers when ``get`` or
    ``put`` last touched it, so that entries in use can be renewed ahead of their deadline
    (``due`` + ``renew``) without a renewal counting as a use."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[K, tuple[float, V, float]] = OrderedDict()

    def get(self, key: K, now: float) -> tuple[Hit, V | None]:
        entry = self._data.get(key)
        if entry is None:
            return Hit.MISS, None
        self._data.move_to_end(key)
        deadline, value, _used = entry
        self._data[key] = (deadline, value, now)
        return (Hit.FRESH if now < deadline else Hit.STALE), value

    def put(self, key: K, value: V, ttl: float, now: float) -> None:
        self._data[key] = (now + ttl, value, now)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def due(self, now: float, ahead_s: float, used_since: float) -> list[tuple[K, V]]:
        """The entries whose deadline is less than ``ahead_s`` away (or past) and that were used
        at or after ``used_since``."""
        return [
            (k, v)
            for k, (deadline, v, used) in self._data.items()
            if used >= used_since and deadline - now < ahead_s
        ]

    def renew(self, key: K, value: V, ttl: float, now: float) -> bool:
        """Give a kept entry a new value and deadline (``now + ttl``) without touching its use
        time or LRU place; an entry no longer kept is not added back. True if renewed."""
        entry = self._data.get(key)
        if entry is None:
            return False
        self._data[key] = (now + ttl, value, entry[2])
        return True

    async def renew_due(
        self,
        ttl: float,
        used_within_s: float,
        now: float,
        read: Callable[[list[tuple[K, V]]], Awaitable[Mapping[K, V]]],
        generation: Callable[[], int],
        select: Callable[[K, V], bool] | None = None,
    ) -> tuple[int, list[K]]:
        """One background renewal (the caches kept warm): once an entry used in the last
        ``used_within_s`` is past half its ``ttl``, every entry used in that window goes to
        ``read``, which returns the new values of those still there; they are renewed from
        ``now`` (the time before the read). Renewing the younger ones early keeps the entries
        on one schedule, so a cache is re-read in one statement per half TTL instead of one per
        entry's own schedule (an early renewal only makes an entry fresher). Returns (entries
        renewed, keys read but not found: the caller drops them). Nothing is kept if
        ``generation()`` changed during the read (a change made meanwhile). ``select``: only
        the entries it accepts are read (the others are left to expire)."""
        since = now - used_within_s

        def chosen(entries: list[tuple[K, V]]) -> list[tuple[K, V]]:
            return entries if select is None else [(k, v) for k, v in entries if select(k, v)]

        if not chosen(self.due(now, ttl / 2, since)):
            return 0, []
        due = chosen(self.due(now, math.inf, since))  # every entry in use, due or not yet
        before = generation()
        found = await read(due)
        if generation() != before:
            return 0, []
        renewed, gone = 0, []
        for key, _old in due:
            if key in found:
                renewed += self.renew(key, found[key], ttl, now)
            else:
                gone.append(key)
        return renewed, gone

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def drop_where(self, pred: Any) -> int:
        """Remove every entry whose value satisfies ``pred``; returns how many."""
        gone = [k for k, (_d, v, _u) in self._data.items() if pred(v)]
        for k in gone:
            del self._data[k]
        return len(gone)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
