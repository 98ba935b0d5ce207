"""The benchmark workload generator (pure)."""

from __future__ import annotations

import itertools
import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from benchmarks.workload import (
    METERS,
    EventFactory,
    Zipf,
    _IsoCache,
    customer_name,
    iso_ms,
    zipf_weights,
)
from schemas.meters import MeterSpec
from schemas.timeutil import epoch_ms, parse_time


def test_meters_are_valid_and_cover_the_five_aggregations() -> None:
    specs = [MeterSpec.model_validate(m) for m in METERS]
    assert sorted(s.aggregation.value for s in specs) == [
        "count",
        "latest",
        "max",
        "sum",
        "unique_count",
    ]
    assert len({s.slug for s in specs}) == len(specs)


def test_zipf_weights_are_a_decreasing_distribution() -> None:
    w = zipf_weights(500, 1.1)
    assert abs(sum(w) - 1) < 1e-9
    assert all(a > b for a, b in itertools.pairwise(w))
    # The heaviest customer gets far more than an even share.
    assert w[0] > 20 / 500


def test_zipf_samples_follow_the_weights() -> None:
    z = Zipf(50, 1.1)
    rnd = random.Random(1)
    counts = Counter(z.sample(rnd) for _ in range(50_000))
    assert set(counts) <= set(range(50))
    top = counts[0] / 50_000
    assert abs(top - z.weights[0]) < 0.02
    assert counts[0] > counts[1] > counts[10]


@given(st.integers(min_value=0, max_value=4_102_444_800_000))
def test_iso_ms_round_trips(ms: int) -> None:
    text = iso_ms(ms)
    assert text.endswith("Z")
    assert epoch_ms(parse_time(text)) == ms
    assert _IsoCache()(ms) == text


def test_factory_batches_have_duplicates_late_events_and_unique_ids() -> None:
    f = EventFactory(
        seed=5, prefix="run-0-", customers=100, zipf_s=1.1, dup_rate=0.1, late_rate=0.05
    )
    now = 1_800_000_000_000
    sent = []
    new_total = 0
    for tenant in (0, 1):
        for _ in range(10):
            events, new = f.batch(tenant, 1000, now)
            assert len(events) == 1000
            sent += [(tenant, e) for e in events]
            new_total += new
    first: dict[tuple[int, str], dict] = {}
    dups = 0
    for tenant, e in sent:
        key = (tenant, e["id"])
        if key in first:
            assert first[key] == e  # a duplicate is an exact copy
            dups += 1
        else:
            first[key] = e
    assert len(first) == new_total
    assert 0.07 < dups / len(sent) < 0.13
    # Ids never collide across tenants of one factory.
    assert len({e["id"] for e in first.values()}) == len(first)
    late = sum(1 for e in first.values() if now - epoch_ms(parse_time(e["time"])) >= 3_600_000)
    assert 0.03 < late / len(first) < 0.07
    for e in first.values():
        assert set(e["properties"]) == {"endpoint", "region", "tokens", "user"}
        assert isinstance(e["properties"]["tokens"], int) and e["properties"]["tokens"] >= 1
        assert 0 <= now - epoch_ms(parse_time(e["time"])) < 72 * 3_600_000
    customers = Counter(e["customer"] for e in first.values())
    assert customers.most_common(1)[0][0] == customer_name(0)


def test_factory_is_deterministic_per_seed() -> None:
    def run(seed: int) -> list[dict]:
        f = EventFactory(seed, "p-", 10, 1.1, 0.05, 0.05)
        return f.batch(0, 200, 1_800_000_000_000)[0]

    assert run(3) == run(3)
    assert run(3) != run(4)
