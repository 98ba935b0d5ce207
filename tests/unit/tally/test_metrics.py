"""The bounded per-tenant counter (pure: no I/O) and the process registry."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from tally.metrics import OTHER, TopTenantCounter, parse_allow_list, process_registry


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def counter(top_n: int = 3, allow: tuple[str, ...] = (), clock: Clock | None = None):  # type: ignore[no-untyped-def]
    return TopTenantCounter(
        "tally_tenant_events", "per tenant", "tenant", top_n=top_n, allow=allow,
        review_s=60, clock=clock or Clock(),
    )  # fmt: skip


def test_few_tenants_are_exact_from_the_first_event() -> None:
    c = counter(top_n=3)
    for tenant, n in (("a", 5), ("b", 2), ("a", 1), ("c", 7)):
        c.inc(tenant, n)
    assert c.snapshot() == {"a": 6, "b": 2, "c": 7, OTHER: 0}


def test_beyond_top_n_the_rest_is_other() -> None:
    c = counter(top_n=2)
    c.inc("a", 1)
    c.inc("b", 1)
    c.inc("c", 10)
    c.inc("d", 3)
    assert c.snapshot() == {"a": 1, "b": 1, OTHER: 13}
    assert c.total() == 15


def test_a_busy_tenant_takes_the_place_of_a_quiet_one_at_review() -> None:
    clock = Clock()
    c = counter(top_n=2, clock=clock)
    c.inc("quiet", 1)
    c.inc("steady", 50)
    for _ in range(10):
        c.inc("busy", 100)  # no series yet: counted in other
    assert "busy" not in c.snapshot()
    clock.t = 61
    c.inc("busy", 100)  # the review runs: busy replaces quiet (its series starts at 0)
    snap = c.snapshot()
    assert set(snap) == {"steady", "busy", OTHER}
    clock.t = 62
    c.inc("busy", 5)
    assert c.snapshot()["busy"] == 5  # counts only since it got its series
    assert c.total() == 1 + 50 + 1000 + 100 + 5


def test_similar_tenants_do_not_flap() -> None:
    clock = Clock()
    c = counter(top_n=1, clock=clock)
    c.inc("a", 100)
    for minute in range(1, 10):
        c.inc("b", 120)  # busier than a, but not twice as busy
        c.inc("a", 100)
        clock.t = minute * 61
    assert set(c.snapshot()) == {"a", OTHER}


def test_allow_list_only_labels_the_listed_tenants() -> None:
    c = counter(top_n=2, allow=("x", "y"))
    assert c.snapshot() == {"x": 0, "y": 0, OTHER: 0}  # present before any event
    c.inc("x", 2)
    c.inc("z", 3)
    c.inc("w", 4)
    assert c.snapshot() == {"x": 2, "y": 0, OTHER: 7}


def test_top_n_zero_puts_everything_in_other() -> None:
    c = counter(top_n=0)
    c.inc("a", 3)
    assert c.snapshot() == {OTHER: 3}


def test_a_tenant_called_other_cannot_take_a_series() -> None:
    c = counter(top_n=3)
    c.inc(OTHER, 2)
    c.inc("a", 1)
    assert c.snapshot() == {"a": 1, OTHER: 2}


@settings(max_examples=150, deadline=None)
@given(
    top_n=st.integers(0, 5),
    ops=st.lists(
        st.tuples(
            st.sampled_from([f"t{i}" for i in range(12)]), st.integers(1, 50), st.floats(0, 40)
        ),
        max_size=200,
    ),
)
def test_bounded_monotonic_and_nothing_lost(top_n: int, ops: list[tuple[str, int, float]]) -> None:
    """At most top_n + 1 series; every series only grows while exported; every increment is in
    an exported series, in other, or in a series that was retired."""
    clock = Clock()
    c = counter(top_n=top_n, clock=clock)
    seen: dict[str, float] = {}
    total = 0
    for tenant, n, dt in ops:
        clock.t += dt
        c.inc(tenant, n)
        total += n
        snap = c.snapshot()
        assert len(snap) <= top_n + 1
        for label, value in snap.items():
            if label in seen and label != OTHER and value < seen[label]:
                raise AssertionError(f"{label} went down without being retired")
        for label in list(seen):
            if label not in snap:
                del seen[label]  # retired: a later series for it starts over
        seen.update(snap)
        assert c.total() == total
    assert sum(c.snapshot().values()) + c.retired == total


def test_exposition_and_process_metrics() -> None:
    reg = process_registry()
    c = TopTenantCounter("tally_tenant_events", "per tenant", "tenant", top_n=2, registry=reg)
    c.inc("acme", 3)
    text = generate_latest(reg).decode()
    assert 'tally_tenant_events_total{tenant="acme"} 3.0' in text
    assert 'tally_tenant_events_total{tenant="other"} 0.0' in text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text


def test_parse_allow_list() -> None:
    assert parse_allow_list(" a, b,,a ,c ") == ("a", "b", "c")
    assert parse_allow_list("") == ()
