"""Lag and freshness arithmetic (pure): what the probe's numbers mean."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.lag import LagReport, LogProbe, PartitionLag, log_end

NOW = 1_700_000_000_000


def test_lag_counts_messages_after_the_stored_offset() -> None:
    assert PartitionLag(0, stored=-1, end=0).lag == 0  # empty partition
    assert PartitionLag(0, stored=-1, end=8).lag == 8  # nothing stored yet
    assert PartitionLag(0, stored=7, end=8).lag == 0  # all stored
    assert PartitionLag(0, stored=4, end=8).lag == 3
    assert PartitionLag(0, stored=9, end=8).lag == 0  # store ahead of a stale end: never < 0


def test_freshness_is_the_age_of_the_first_unstored_message() -> None:
    p = PartitionLag(0, stored=4, end=8, first_unstored_ms=NOW - 2_500)
    assert p.freshness_s(NOW) == 2.5
    assert PartitionLag(0, stored=7, end=8, first_unstored_ms=NOW - 9_000).freshness_s(NOW) == 0
    assert PartitionLag(0, stored=4, end=8, first_unstored_ms=None).freshness_s(NOW) == 0
    assert PartitionLag(0, stored=4, end=8, first_unstored_ms=NOW + 500).freshness_s(NOW) == 0


def test_report_sums_and_takes_the_worst_partition() -> None:
    r = LagReport(
        NOW,
        (
            PartitionLag(0, 4, 8, NOW - 1_000),
            PartitionLag(1, -1, 2, NOW - 7_000),
            PartitionLag(2, 5, 6, None),
        ),
    )
    assert r.total_lag == 3 + 2 + 0
    assert r.by_partition == {0: 3, 1: 2, 2: 0}
    assert r.freshness_s() == 7.0
    assert r.freshness_s(NOW + 3_000) == 10.0  # ages keep growing until the next measurement
    d = r.describe(NOW + 1_000)
    assert d["total"] == 5 and d["partitions"] == {"0": 3, "1": 2, "2": 0}
    assert d["freshness_s"] == 8.0 and d["measured_s_ago"] == 1.0 and d["error"] is None
    assert LagReport(NOW).total_lag == 0 and LagReport(NOW).freshness_s() == 0


def test_log_end_takes_the_best_lower_bound() -> None:
    # Tansu: ListOffsets says 6 (last batch base + 1) while the fetch high watermark says 8
    assert log_end(8, 6, -1) == 8
    assert log_end(None, 6, -1) == 6
    assert log_end(None, None, 9) == 10  # read offset 9 -> the log holds at least 10
    assert log_end(None, None, -1) == 0


@given(
    stored=st.integers(-1, 10_000),
    lag=st.integers(0, 10_000),
    age_ms=st.integers(0, 10**7),
)
def test_lag_and_freshness_invariants(stored: int, lag: int, age_ms: int) -> None:
    p = PartitionLag(3, stored, stored + 1 + lag, NOW - age_ms)
    assert p.lag == lag
    assert (p.freshness_s(NOW) == 0) == (lag == 0 or age_ms == 0)
    assert p.freshness_s(NOW) == (age_ms / 1000 if lag else 0)


def test_a_closed_probe_makes_no_new_client() -> None:
    """After close() a ping (e.g. a readiness request still in flight at shutdown) must not
    create a client nobody closes: librdkafka tearing it down at exit can crash the process."""
    probe = LogProbe("127.0.0.1:1", "events")
    probe.close()
    assert probe.ping(timeout=0.1) is False
    with pytest.raises(RuntimeError, match="closed"):
        probe.measure({0: -1}, timeout=0.1)
    assert probe._consumer is None
