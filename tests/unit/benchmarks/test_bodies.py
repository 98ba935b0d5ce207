"""The load generator's request bodies (``BodyFactory``): the API accepts them and they carry the
workload ``EventFactory`` defines (the statistics are checked on both factories alike)."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.ingest_parse import Limits, as_items, load_json, parse_native
from benchmarks.workload import (
    ENDPOINTS,
    EVENT_TYPE,
    LATE_MAX_MS,
    LATE_MIN_MS,
    MEAN_TOKENS,
    RECENT_MAX,
    REGIONS,
    USERS,
    BodyFactory,
    EventFactory,
    alias_table,
    customer_name,
    seq_digits,
    user_name,
    zipf_weights,
)
from schemas.timeutil import epoch_ms, parse_time

NOW = 1_800_000_000_000
LIMITS = Limits(max_events=1000, max_lateness_ms=35 * 86_400_000, max_future_ms=300_000)
CUSTOMERS = 1000
ZIPF_S = 1.1
DUP_RATE = 0.1
LATE_RATE = 0.05


def body_batches(seed: int, prefix: str) -> Callable[[int, int, int], tuple[bytes, int]]:
    f = BodyFactory(seed, prefix, CUSTOMERS, ZIPF_S, DUP_RATE, LATE_RATE)
    return f.body


def dict_batches(seed: int, prefix: str) -> Callable[[int, int, int], tuple[bytes, int]]:
    f = EventFactory(seed, prefix, CUSTOMERS, ZIPF_S, DUP_RATE, LATE_RATE)

    def body(tenant: int, n: int, now_ms: int) -> tuple[bytes, int]:
        events, new = f.batch(tenant, n, now_ms)
        return orjson.dumps(events), new

    return body


@dataclass
class Sample:
    """What a factory sent: every event in order with its tenant and batch time."""

    sent: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)
    new_reported: int = 0


def run(make: Callable[..., Callable[[int, int, int], tuple[bytes, int]]], batches: int) -> Sample:
    body = make(11, "run-1-")
    out = Sample()
    for i in range(batches):
        tenant = i % 3
        now = NOW + i * 250  # time moves on: copies of earlier batches keep their own time
        raw, new = body(tenant, 1000, now)
        out.new_reported += new
        out.sent += [(tenant, now, e) for e in orjson.loads(raw)]
    return out


@pytest.fixture(scope="module", params=[body_batches, dict_batches], ids=["bodies", "dicts"])
def sample(request: pytest.FixtureRequest) -> Sample:
    # 120 batches: 40k events per tenant, so copies also come from a full RECENT_MAX window.
    return run(request.param, 120)


def new_events(s: Sample) -> list[tuple[int, int, dict[str, Any]]]:
    seen: set[str] = set()
    out = []
    for tenant, now, e in s.sent:
        if e["id"] not in seen:
            seen.add(e["id"])
            out.append((tenant, now, e))
    return out


def chi2(observed: list[int], expected: list[float]) -> float:
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))


def test_every_body_is_accepted_by_the_api_parser() -> None:
    f = BodyFactory(3, "run-2-", CUSTOMERS, ZIPF_S, DUP_RATE, LATE_RATE)
    for i in range(40):
        now = NOW + i * 1000
        n = 1000 if i % 4 else 1 + i  # small batches too (a copy can be the only event)
        raw, _new = f.body(i % 2, n, now)
        items = as_items(load_json(raw))
        assert len(items) == n
        res = parse_native(items, now, LIMITS)
        assert res.errors == []
        assert len(res.rows) == n
        # The layout orjson gives the same events (what the load generator used to send).
        assert orjson.dumps(items) == raw


def test_ids_are_unique_per_factory_and_prefix() -> None:
    a = BodyFactory(1, "run-7-0-", CUSTOMERS, ZIPF_S, 0.0, LATE_RATE)
    b = BodyFactory(1, "run-7-1-", CUSTOMERS, ZIPF_S, 0.0, LATE_RATE)  # same seed, other process
    ids: list[str] = []
    for i in range(60):
        for f in (a, b):
            raw, new = f.body(i % 4, 1000, NOW + i)
            events = orjson.loads(raw)
            assert new == len(events) == 1000
            ids += [e["id"] for e in events]
    assert len(set(ids)) == len(ids) == 120_000
    assert all(e.startswith(("run-7-0-", "run-7-1-")) for e in ids)


def test_reported_new_counts_first_sends(sample: Sample) -> None:
    assert sample.new_reported == len(new_events(sample))


def test_copies_are_exact_copies_of_a_recent_event_of_the_same_tenant(sample: Sample) -> None:
    first: dict[str, tuple[int, dict[str, Any], int]] = {}
    sent_new = Counter[int]()  # new events per tenant so far
    copies = 0
    for tenant, _now, e in sample.sent:
        seen = first.get(e["id"])
        if seen is None:
            first[e["id"]] = (tenant, e, sent_new[tenant])
            sent_new[tenant] += 1
            continue
        copies += 1
        orig_tenant, orig, position = seen
        assert orig_tenant == tenant
        assert orig == e
        # One of the tenant's last RECENT_MAX new events.
        assert sent_new[tenant] - position <= RECENT_MAX
    share = copies / len(sample.sent)
    assert abs(share - DUP_RATE) < 0.006, share


def test_event_shape_and_times(sample: Sample) -> None:
    late = 0
    offsets = []
    events = new_events(sample)
    for _tenant, now, e in events:
        assert set(e) == {"id", "type", "customer", "time", "properties"}
        assert e["type"] == EVENT_TYPE
        back = now - epoch_ms(parse_time(e["time"]))
        if back >= LATE_MIN_MS:
            assert back < LATE_MAX_MS
            late += 1
        else:
            assert 0 <= back < 2000
            offsets.append(back)
    assert abs(late / len(events) - LATE_RATE) < 0.005
    assert abs(sum(offsets) / len(offsets) - 999.5) < 15  # uniform over [0, 2000)


def test_customers_follow_the_zipf_weights(sample: Sample) -> None:
    w = zipf_weights(CUSTOMERS, ZIPF_S)
    events = new_events(sample)
    rank = {customer_name(r): r for r in range(CUSTOMERS)}
    counts = Counter(rank[e["customer"]] for _, _, e in events)
    n = len(events)
    groups = [(0, 1), (1, 2), (2, 3), (3, 5), (5, 10), (10, 50), (50, 200), (200, CUSTOMERS)]
    observed = [sum(counts[r] for r in range(a, b)) for a, b in groups]
    expected = [n * sum(w[a:b]) for a, b in groups]
    assert chi2(observed, expected) < 40  # 7 degrees of freedom: p < 1e-5


def test_properties_follow_the_spec(sample: Sample) -> None:
    events = [e for _, _, e in new_events(sample)]
    n = len(events)
    props = [e["properties"] for e in events]
    assert all(set(p) == {"endpoint", "region", "tokens", "user"} for p in props)
    endpoints = Counter(p["endpoint"] for p in props)
    regions = Counter(p["region"] for p in props)
    assert set(endpoints) == set(ENDPOINTS) and set(regions) == set(REGIONS)
    assert chi2([endpoints[x] for x in ENDPOINTS], [n / len(ENDPOINTS)] * len(ENDPOINTS)) < 30
    assert chi2([regions[x] for x in REGIONS], [n / len(REGIONS)] * len(REGIONS)) < 30
    users = {user_name(i): i for i in range(USERS)}
    user_bins = Counter(users[p["user"]] * 10 // USERS for p in props)
    assert chi2([user_bins[b] for b in range(10)], [n / 10] * 10) < 40
    tokens = [p["tokens"] for p in props]
    assert all(type(t) is int and t >= 1 for t in tokens)
    # int(Exp(mean m)) + 1 is geometric: P(tokens <= k) = 1 - e^(-k/m), mean 1 / (1 - e^(-1/m)).
    mean = 1 / (1 - math.exp(-1 / MEAN_TOKENS))
    assert abs(sum(tokens) / n - mean) < 6  # ~5 standard errors
    edges = [0, 1, 10, 100, 400, 1000, 3000, math.inf]
    observed = [sum(a < t <= b for t in tokens) for a, b in itertools.pairwise(edges)]
    cdf = [1 - math.exp(-k / MEAN_TOKENS) for k in edges]
    expected = [n * (b - a) for a, b in itertools.pairwise(cdf)]
    assert chi2(observed, expected) < 40  # 6 degrees of freedom: p < 1e-6


def test_tokens_beyond_the_table_are_written_out() -> None:
    f = BodyFactory(1, "p-", 10, 1.1, 0.0, 0.0)
    rows, _new = f.rows(0, 3, NOW)
    rows[1, 3] = 123_456_789  # the tokens column; P ~ 1e-18 per event in a real draw
    events = orjson.loads(f.encode(0, rows))
    assert [e["properties"]["tokens"] for e in events][1] == 123_456_789
    assert parse_native(events, NOW, LIMITS).errors == []


def test_a_batch_is_the_same_for_the_same_seed() -> None:
    def bodies(seed: int) -> list[bytes]:
        f = BodyFactory(seed, "p-", 10, 1.1, 0.05, 0.05)
        return [f.body(t, 300, NOW)[0] for t in (0, 1, 0)]

    assert bodies(3) == bodies(3)
    assert bodies(3) != bodies(4)


def test_rejects_bad_rates_and_empty_batches() -> None:
    with pytest.raises(ValueError, match="dup_rate"):
        BodyFactory(1, "p-", 10, 1.1, 1.0, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        BodyFactory(1, "p-", 10, 1.1, 0.0, 0.0).body(0, 0, NOW)


@given(st.lists(st.integers(min_value=0, max_value=10**10 - 1), min_size=1, max_size=50))
def test_seq_digits_are_ten_digit_decimals(values: list[int]) -> None:
    got = seq_digits(np.array(values, dtype=np.int64)).tolist()
    assert got == [b"%010d" % v for v in values]


@given(st.lists(st.floats(min_value=1e-6, max_value=1.0), min_size=1, max_size=60))
def test_alias_table_gives_each_value_its_probability(weights: list[float]) -> None:
    prob, alias = alias_table(weights)
    n = len(weights)
    assert ((prob >= 0) & (prob <= 1)).all() and ((alias >= 0) & (alias < n)).all()
    implied = prob / n
    np.add.at(implied, alias, (1 - prob) / n)
    total = sum(weights)
    assert np.allclose(implied, [w / total for w in weights], atol=1e-9)
