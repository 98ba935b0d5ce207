"""The benchmark workload (pure, deterministic for a seed): meters, customers, events.

One realistic event type with 4 properties, 5 meters on it (count, sum, max, unique_count,
latest). Customers of a tenant are Zipf-distributed (a few customers send most events). A share of
the events are exact duplicates of recent ones (client retries) and a share are late (hours to
days old).

``EventFactory`` gives the events as dicts (readable; the reference). ``BodyFactory`` gives the same
workload as ready JSON request bodies at a fraction of the CPU: the load generator uses it, since
it runs on the machine it measures.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import deque
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

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


# --- the load generator's factory: the same workload as request bodies, built in bulk --------

RECENT_MAX = 5000  # duplicates are copies of one of the last RECENT_MAX new events of a tenant
SEQ_DIGITS = 10  # ids end in a 10-digit sequence number, as EventFactory's do
_TOKENS_TABLE = 1 << 14  # tokens below this come from a table (P(tokens >= 16384) ~ 1e-18)
_SECONDS_CACHE_MAX = 1 << 16
# "0000".."9999" as 4 ASCII bytes in one uint32 each (the sequence digits are built from them)
_DIGITS4 = np.frombuffer(b"".join(b"%04d" % i for i in range(10_000)), dtype=np.uint32)
# Columns of a drawn event (one int64 row): its content is a pure function of the row, so a
# duplicate (the same row again) is an exact copy.
_SEQ, _CUST, _ER, _TOK, _USER, _TIME = range(6)
_ENDPOINT_REGIONS = len(ENDPOINTS) * len(REGIONS)  # _ER = endpoint index * len(REGIONS) + region


def alias_table(weights: list[float]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Walker's alias table of a distribution: draw ``i`` uniform in ``range(len(weights))``,
    then keep ``i`` with probability ``prob[i]``, else take ``alias[i]`` (Vose's construction).
    """
    n = len(weights)
    total = sum(weights)
    scaled = [w * n / total for w in weights]
    prob = [1.0] * n
    alias = list(range(n))
    small = [i for i, p in enumerate(scaled) if p < 1.0]
    large = [i for i, p in enumerate(scaled) if p >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    # Whatever is left is 1 up to rounding: prob stays 1.0, alias itself.
    return np.array(prob), np.array(alias, dtype=np.int64)


def seq_digits(seq: npt.NDArray[np.int64]) -> npt.NDArray[np.bytes_]:
    """``b"%010d" % s`` for every ``s`` in ``seq`` (0 <= s < 10**10), as an array."""
    quads = np.empty((len(seq), 3), dtype=np.uint32)
    high, low = np.divmod(seq, 10_000)
    quads[:, 0], quads[:, 1] = np.divmod(high, 10_000)
    quads[:, 0] = _DIGITS4[quads[:, 0]]
    quads[:, 1] = _DIGITS4[quads[:, 1]]
    quads[:, 2] = _DIGITS4[low]
    return quads.view(np.uint8)[:, 12 - SEQ_DIGITS :].copy().view(f"S{SEQ_DIGITS}").ravel()


def _js(s: str) -> bytes:
    """``s`` as a JSON string without the quotes."""
    return orjson.dumps(s)[1:-1]


def _table(pieces: list[bytes]) -> npt.NDArray[np.object_]:
    out = np.empty(len(pieces), dtype=object)
    out[:] = pieces
    return out


class _Recent:
    """The last RECENT_MAX new events (rows) of a tenant, in order, in a reused buffer."""

    def __init__(self) -> None:
        self.buf = np.empty((4 * RECENT_MAX, 6), dtype=np.int64)
        self.start = 0
        self.end = 0

    @property
    def size(self) -> int:
        return self.end - self.start

    def extend(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Append ``rows``; returns the previous events followed by ``rows`` (a view)."""
        m = len(rows)
        if self.end + m > len(self.buf):
            kept = self.buf[self.start : self.end].copy()
            if len(kept) + m > len(self.buf):
                self.buf = np.empty((2 * (len(kept) + m), 6), dtype=np.int64)
            self.buf[: len(kept)] = kept
            self.start, self.end = 0, len(kept)
        begin = self.start
        self.buf[self.end : self.end + m] = rows
        self.end += m
        self.start = max(self.start, self.end - RECENT_MAX)
        return self.buf[begin : self.end]


class BodyFactory:
    """The workload of ``EventFactory`` as ready request bodies, at a fraction of its CPU cost.

    ``body(tenant, n, now_ms)`` returns a JSON array of ``n`` native events (bytes, the same
    layout ``orjson.dumps`` gives for EventFactory's dicts) and how many are new; the others are
    exact copies (same id, same content) of one of the last ``RECENT_MAX`` new events of the
    same tenant, as a client retry would send. The distributions are EventFactory's: customers
    Zipf(``zipf_s``) over ``customers``, endpoint and region uniform, tokens
    ``int(Exp(mean MEAN_TOKENS)) + 1``, user uniform over USERS, time ``now - U[0, 2000)`` ms or,
    for a ``late_rate`` share, ``now - U[LATE_MIN_MS, LATE_MAX_MS)``; ids
    ``{prefix}{tenant}-{seq:010d}``, one sequence per factory (unique per prefix).

    How: every field of a batch is drawn at once with numpy (one int64 row per event), and the
    body is one ``bytes.join`` of pre-serialised pieces picked by those numbers (e.g. one piece
    per customer, one per (millisecond, endpoint, region), one per second of the event time);
    the sequence digits are computed as an array.
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
        self.rng = np.random.default_rng(seed)
        self.prefix = prefix
        self.weights = zipf_weights(customers, zipf_s)
        self._prob, self._alias = alias_table(self.weights)
        self.dup_rate = dup_rate
        self.late_rate = late_rate
        self.seq = 0
        self._recent: dict[int, _Recent] = {}
        self._seconds: dict[int, bytes] = {}
        # An event is 6 pieces: seq digits | type + customer | second | millisecond + endpoint
        # + region | tokens | user + the next event's head ('"}},{"id":"<prefix><tenant>-').
        self._cust = _table(
            [
                b'","type":"' + _js(EVENT_TYPE) + b'","customer":"'
                + _js(customer_name(r)) + b'","time":"'
                for r in range(customers)
            ]
        )  # fmt: skip
        self._ms_er = _table(
            [
                b'%03dZ","properties":{"endpoint":"' % ms
                + _js(e) + b'","region":"' + _js(r) + b'","tokens":'
                for ms in range(1000)
                for e in ENDPOINTS
                for r in REGIONS
            ]
        )  # fmt: skip
        self._tok = _table([b'%d,"user":"' % i for i in range(_TOKENS_TABLE)])
        self._users = [_js(user_name(i)) + b'"}}' for i in range(USERS)]
        self._user_last = _table([u + b"]" for u in self._users])
        self._user_next: dict[int, npt.NDArray[np.object_]] = {}  # per tenant
        self._heads: dict[int, bytes] = {}

    def _second(self, sec: int) -> bytes:
        piece = self._seconds.get(sec)
        if piece is None:
            if len(self._seconds) >= _SECONDS_CACHE_MAX:
                self._seconds.clear()
            piece = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S.").encode()
            self._seconds[sec] = piece
        return piece

    def _draw(self, m: int, now_ms: int) -> npt.NDArray[np.int64]:
        """``m`` new events as rows (see ``_SEQ`` ...)."""
        rng = self.rng
        rows = np.empty((m, 6), dtype=np.int64)
        if self.seq + m >= 10**SEQ_DIGITS:
            raise RuntimeError("event sequence exhausted; use a new prefix")
        rows[:, _SEQ] = np.arange(self.seq + 1, self.seq + m + 1)
        self.seq += m
        pick = rng.integers(0, len(self._prob), m)
        rows[:, _CUST] = np.where(rng.random(m) < self._prob[pick], pick, self._alias[pick])
        rows[:, _ER] = rng.integers(0, _ENDPOINT_REGIONS, m)
        rows[:, _TOK] = rng.exponential(MEAN_TOKENS, m).astype(np.int64) + 1
        rows[:, _USER] = rng.integers(0, USERS, m)
        back = rng.integers(0, 2000, m)
        late = rng.random(m) < self.late_rate
        n_late = int(late.sum())
        if n_late:
            back[late] = rng.integers(LATE_MIN_MS, LATE_MAX_MS, n_late)
        rows[:, _TIME] = now_ms - back
        return rows

    def rows(self, tenant: int, n: int, now_ms: int) -> tuple[npt.NDArray[np.int64], int]:
        """The rows of the next batch of ``tenant`` and how many of them are new."""
        if n < 1:
            raise ValueError("a batch has at least one event")
        rng = self.rng
        recent = self._recent.get(tenant)
        if recent is None:
            recent = self._recent[tenant] = _Recent()
        r = recent.size
        dup = rng.random(n) < self.dup_rate
        if r == 0:
            dup[0] = False  # nothing to copy yet
        new_mask = ~dup
        m = int(new_mask.sum())
        # The tenant's stream of new events: its last r, then this batch's m.
        stream = recent.extend(self._draw(m, now_ms))
        # Before position i, the tenant has sent r + k[i] of them; a copy at i picks one of the
        # last RECENT_MAX (this batch's new events before i included).
        k: npt.NDArray[np.int64] = np.cumsum(new_mask) - new_mask
        avail = r + k
        lo = np.maximum(avail - RECENT_MAX, 0)
        pick = lo + (rng.random(n) * (avail - lo)).astype(np.int64)
        return stream[np.where(new_mask, avail, pick)], m

    def body(self, tenant: int, n: int, now_ms: int) -> tuple[bytes, int]:
        """A request body of ``n`` events for ``tenant`` and how many of them are new."""
        rows, new = self.rows(tenant, n, now_ms)
        return self.encode(tenant, rows), new

    def encode(self, tenant: int, rows: npt.NDArray[np.int64]) -> bytes:
        """The JSON array of the events ``rows``."""
        head = self._heads.get(tenant)
        if head is None:
            head = self._heads[tenant] = b'{"id":"' + _js(f"{self.prefix}{tenant}-")
            self._user_next[tenant] = _table([u + b"," + head for u in self._users])
        n = len(rows)
        t = rows[:, _TIME]
        secs, inv = np.unique(t // 1000, return_inverse=True)
        second = _table([self._second(s) for s in secs.tolist()])
        tok = rows[:, _TOK]
        big = tok >= _TOKENS_TABLE
        user = rows[:, _USER]
        parts = np.empty((n, 6), dtype=object)
        parts[:, 0] = seq_digits(rows[:, _SEQ])
        parts[:, 1] = self._cust[rows[:, _CUST]]
        parts[:, 2] = second[inv]
        parts[:, 3] = self._ms_er[t % 1000 * _ENDPOINT_REGIONS + rows[:, _ER]]
        parts[:, 4] = self._tok[np.where(big, 0, tok)]
        if big.any():  # practically never (P ~ 1e-18 per event)
            for i in np.flatnonzero(big).tolist():
                parts[i, 4] = b'%d,"user":"' % int(tok[i])
        parts[:, 5] = self._user_next[tenant][user]
        parts[n - 1, 5] = self._user_last[user[n - 1]]
        pieces = parts.ravel().tolist()
        pieces.insert(0, b"[" + head)
        return b"".join(pieces)
