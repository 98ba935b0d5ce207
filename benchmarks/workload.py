"""The benchmark workload (pure, deterministic for a seed): meters, customers, events.

One realistic event type with 4 properties, 5 meters on it (count, sum, max, unique_count,
latest). Customers of a tenant are Zipf-distributed (a few customers send most events). A share of
the events are exact duplicates of recent ones (client retries) and a share are late (hours to
days old).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import deque
from datetime import UTC, datetime
from typing import Any

EVENT_TYPE = "api.request"
METERS: list[dict[str, Any]] = [
    {"slug": "requests", "event_type": EVENT_TYPE, "aggregation": "count"},
    {
        "slug": "tokens",
        "event_type": EVENT_TYPE,
        "aggregation": "sum",
        "value_property": "$.tokens",
    },
    {
        "slug": "tokens-max",
        "event_type": EVENT_TYPE,
        "aggregation": "max",
        "value_property": "$.tokens",
    },
    {
        "slug": "users",
        "event_type": EVENT_TYPE,
        "aggregation": "unique_count",
        "value_property": "$.user",
    },
    {
        "slug": "last-tokens",
        "event_type": EVENT_TYPE,
        "aggregation": "latest",
        "value_property": "$.tokens",
    },
]
COUNT_METER = "requests"

ENDPOINTS = [
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/audio/transcriptions",
    "/v1/moderations",
    "/v1/files",
]
REGIONS = ["eu-west-1", "eu-central-1", "us-east-1", "us-west-2", "ap-southeast-1"]
USERS = 5000  # distinct end users per customer at most (the unique_count meter counts them)
MEAN_TOKENS = 400
LATE_MIN_MS = 3_600_000  # a late event is 1 h ...
LATE_MAX_MS = 72 * 3_600_000  # ... to 3 days old


def customer_name(rank: int) -> str:
    """The customer of Zipf rank ``rank`` (0 = the heaviest)."""
    return f"cust-{rank:06d}"


def user_name(i: int) -> str:
    return f"user-{i:05d}"


def zipf_weights(n: int, s: float) -> list[float]:
    """Probabilities of ranks 0..n-1 under a bounded Zipf law with exponent ``s``."""
    if n < 1:
        raise ValueError("need at least one customer")
    raw = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class Zipf:
    """Samples ranks 0..n-1 with probability proportional to 1/(rank+1)^s."""

    def __init__(self, n: int, s: float) -> None:
        self.weights = zipf_weights(n, s)
        self._cum = list(itertools.accumulate(self.weights))
        self._cum[-1] = 1.0

    def sample(self, rnd: random.Random) -> int:
        return bisect.bisect_left(self._cum, rnd.random())


def iso_ms(ms: int) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-30T08:15:26.123Z``."""
    return (
        datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    )


class _IsoCache:
    """``iso_ms`` with the seconds prefix cached (the load generator formats ~100k times/s)."""

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def __call__(self, ms: int) -> str:
        sec = ms // 1000
        if sec != self._sec:
            self._sec = sec
            self._prefix = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        return f"{self._prefix}{ms % 1000:03d}Z"


class EventFactory:
    """Batches of events for one tenant at a time; ids are unique per factory ``prefix``.

    ``batch`` returns the events and how many of them are new (the rest are exact copies of
    recent events of the same tenant: same id, same content, as a client retry would send).
    """

    def __init__(
        self,
        seed: int,
        prefix: str,
        customers: int,
        zipf_s: float,
        dup_rate: float,
        late_rate: float,
    ) -> None:
        if not 0 <= dup_rate < 1 or not 0 <= late_rate < 1:
            raise ValueError("dup_rate and late_rate must be in [0, 1)")
        self.rnd = random.Random(seed)
        self.prefix = prefix
        self.zipf = Zipf(customers, zipf_s)
        self.dup_rate = dup_rate
        self.late_rate = late_rate
        self.seq = 0
        self._recent: dict[int, deque[dict[str, Any]]] = {}
        self._iso = _IsoCache()

    def event(self, tenant: int, now_ms: int) -> dict[str, Any]:
        rnd = self.rnd
        self.seq += 1
        if rnd.random() < self.late_rate:
            t = now_ms - rnd.randrange(LATE_MIN_MS, LATE_MAX_MS)
            time_s = iso_ms(t)
        else:
            time_s = self._iso(now_ms - rnd.randrange(0, 2000))
        return {
            "id": f"{self.prefix}{tenant}-{self.seq:010d}",
            "type": EVENT_TYPE,
            "customer": customer_name(self.zipf.sample(rnd)),
            "time": time_s,
            "properties": {
                "endpoint": ENDPOINTS[rnd.randrange(len(ENDPOINTS))],
                "region": REGIONS[rnd.randrange(len(REGIONS))],
                "tokens": int(rnd.expovariate(1 / MEAN_TOKENS)) + 1,
                "user": user_name(rnd.randrange(USERS)),
            },
        }

    def batch(self, tenant: int, n: int, now_ms: int) -> tuple[list[dict[str, Any]], int]:
        recent = self._recent.get(tenant)
        if recent is None:
            recent = self._recent[tenant] = deque(maxlen=5000)
        out: list[dict[str, Any]] = []
        new = 0
        rnd = self.rnd
        for _ in range(n):
            if recent and rnd.random() < self.dup_rate:
                out.append(recent[rnd.randrange(len(recent))])
            else:
                ev = self.event(tenant, now_ms)
                recent.append(ev)
                out.append(ev)
                new += 1
        return out, new
