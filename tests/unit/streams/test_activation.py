"""The activation rule, the backfill boundary (its exact complement), and the lock decision."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from schemas.backfill import ALL_OFFSETS, COMPLETE, FAILED, RUNNING, Boundary, LockRow, RunRecord
from streams.activation import Activations, meter_applies
from streams.backfill import decide_lock, make_boundary, pending_partitions

G1, G2, G3 = "tally.events.g1000", "tally.events.g2000", "tally.events.g3000"


def test_rule_table() -> None:
    # activated in an older topic (or stored without markers): every event of a newer topic
    assert meter_applies(G1, G2, None, 0)
    assert meter_applies("", G1, None, 0)
    assert meter_applies("", "tally.events", None, 0)
    # same topic: strictly after the first marker of the partition
    assert not meter_applies(G2, G2, None, 5)
    assert not meter_applies(G2, G2, 5, 4)
    assert not meter_applies(G2, G2, 5, 5)
    assert meter_applies(G2, G2, 5, 6)
    # activated in a newer topic: never in the older one (the backfill covers it)
    assert not meter_applies(G3, G2, 1, 10)


def test_activations_state() -> None:
    a = Activations(G2)
    a.assign(0, 10)
    assert a.to_load() == {0: 10}
    a.load(0, {"m1": 3})
    assert a.to_load() == {}
    assert a.applies("m1", G2, 0, 4) and not a.applies("m1", G2, 0, 3)
    assert not a.applies("m1", G2, 1, 99)  # no marker in partition 1
    assert a.mark(1, "m1", 7)  # first marker: a row to write
    assert a.mark(1, "m1", 7)  # the same marker again (retried flush): the same row again
    assert not a.mark(1, "m1", 9)  # a later repeat: ignored
    assert a.first_markers(1) == {"m1": 7}
    assert a.applies("m1", G2, 1, 8)
    assert a.applies("old", G1, 3, 0) and a.applies("legacy", "", 3, 0)
    assert not a.applies("new", G3, 3, 10**9)
    a.revoke(1)
    assert a.first_markers(1) == {}
    a.assign(0, 2)  # re-assigned with a lower progress: reloaded from the store
    assert a.first_markers(0) == {} and a.to_load() == {0: 2}


topics = st.sampled_from(["", "tally.events", "other", G1, G2, G3])


@given(
    meter_topic=topics.filter(bool),
    event_topic=topics.filter(bool),
    markers=st.dictionaries(st.integers(0, 3), st.integers(0, 50), max_size=4),
    partition=st.integers(0, 3),
    offset=st.integers(0, 60),
)
def test_backfill_boundary_is_the_exact_complement_of_the_stream(
    meter_topic: str, event_topic: str, markers: dict[int, int], partition: int, offset: int
) -> None:
    """Every event is counted by exactly one side, whatever the topics and marker positions
    (offset == marker offset is the marker itself, not an event)."""
    first = markers.get(partition) if event_topic == meter_topic else None
    if first is not None and offset == first:
        return
    stream = meter_applies(meter_topic, event_topic, first, offset)
    boundary = make_boundary(meter_topic, [event_topic, "tally.events", G1], markers)
    assert stream != boundary.includes(event_topic, partition, offset)


def test_make_boundary_and_json() -> None:
    b = make_boundary(G2, [G3, G1, "tally.events", G2, G1], {0: 4, 2: 9})
    assert b.older == ("tally.events", G1)
    assert b.includes(G1, 0, 10**9) and b.includes(G2, 0, 3) and not b.includes(G2, 0, 5)
    assert b.includes(G2, 1, 10**9)  # partition without a marker in a dead topic: all of it
    assert not b.includes(G3, 0, 0)
    assert Boundary.from_json(b.to_json()) == b
    assert b.bounds.get(1, ALL_OFFSETS) == ALL_OFFSETS


def test_pending_partitions() -> None:
    assert pending_partitions(3, {0: 4, 1: 2, 2: 0}, {0: 4, 1: 10, 2: 0}) == []
    assert pending_partitions(3, {0: 4, 2: 0}, {0: 3, 2: 5}) == [0, 1]


def _lock(acquired: int) -> LockRow:
    return LockRow("t", "m", 3, "run1", "owner", acquired)


def _run(state: str, beat: int, version: int = 5) -> RunRecord:
    return RunRecord("t", "m", "run1", state=state, heartbeat_ms=beat, version=version)


def test_lock_decision() -> None:
    lease = 60_000
    assert decide_lock(None, None, 100, lease) == ("new", None)
    assert decide_lock(_lock(0), _run(COMPLETE, 50), 100, lease) == ("new", None)
    assert decide_lock(_lock(0), _run(FAILED, 50), 100, lease) == ("new", None)
    assert decide_lock(_lock(0), _run(RUNNING, 90_000), 100_000, lease) == ("held", "run1")
    assert decide_lock(_lock(0), _run(RUNNING, 30_000), 100_000, lease) == ("resume", "run1")
    # lock taken, run row not written yet: the lock row's time counts
    assert decide_lock(_lock(90_000), None, 100_000, lease) == ("held", "run1")
    assert decide_lock(_lock(10_000), None, 100_000, lease) == ("resume", "run1")
    # released by its holder after an error: resumable at once
    assert decide_lock(_lock(99_000), _run(RUNNING, 0), 100_000, lease) == ("resume", "run1")
