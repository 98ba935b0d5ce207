"""The stored rate of a load step from the poller's samples (no server: samples made up here)."""

from __future__ import annotations

import threading
import time
from typing import Any

from benchmarks.loadgen import StepStats
from benchmarks.run import step_row, stored_text
from benchmarks.target import StoredPoller, StoredSpan, Totals


def _poller(*samples: tuple[float, int]) -> StoredPoller:
    poller = StoredPoller(Totals("http://127.0.0.1:1", []), 1.0)  # never started: no queries
    poller.samples.extend(samples)
    return poller


def _row(span: StoredSpan | None, tally_cores: float) -> dict[str, Any]:
    """The row of a 5 s step at 8,000 events/s offered, 16 clients."""
    step = StepStats("ramp", started=100.0, window_start=100.0, ended=105.0)
    return step_row(step, 8_000.0, 16, span, {"tally_cpu_cores": tally_cores})


def test_a_step_with_two_samples_inside_uses_the_outermost() -> None:
    p = _poller((99.0, 0), (100.5, 1_000), (102.0, 4_000), (104.5, 9_000), (106.0, 50_000))
    span = p.step_span(100.0, 105.0, wait_s=0)
    assert span == StoredSpan((100.5, 1_000), (104.5, 9_000))
    assert span.rate == 2_000
    assert p.span(100.0, 105.0) == span


def test_slow_polls_give_the_span_around_the_step_not_zero() -> None:
    # one sample inside the step: the plain rate is unknown ...
    p = _poller((98.0, 500), (102.0, 4_000), (107.0, 14_500))
    assert p.span(100.0, 105.0) is None
    # ... and the step's rate comes from the samples around it, with the span it covered
    span = p.step_span(100.0, 105.0, wait_s=0)
    assert span == StoredSpan((98.0, 500), (107.0, 14_500))
    assert span.seconds == 9.0
    assert span.rate == 14_000 / 9.0


def test_without_a_sample_before_the_step_the_first_inside_starts_the_span() -> None:
    p = _poller((101.0, 100), (106.0, 5_100))
    assert p.step_span(100.0, 105.0, wait_s=0) == StoredSpan((101.0, 100), (106.0, 5_100))


def test_the_span_waits_for_the_next_sample_after_the_step() -> None:
    now = time.time()
    p = _poller((now - 10, 0), (now - 5, 1_000))

    def late_sample() -> None:
        time.sleep(0.2)
        with p._lock:
            p.samples.append((time.time(), 3_000))

    t = threading.Thread(target=late_sample)
    t.start()
    span = p.step_span(now - 6, now, wait_s=30)
    t.join()
    assert span is not None
    assert span.first == (now - 10, 0)
    assert span.last[1] == 3_000


def test_no_sample_after_the_step_is_unknown_not_zero() -> None:
    p = _poller((98.0, 500), (102.0, 4_000))
    assert p.step_span(100.0, 105.0, wait_s=0) is None
    assert stored_text(None) == "n/a"
    row = _row(None, tally_cores=1.2)
    assert row["stored_events_per_s"] is None
    assert row["stored_span_s"] is None
    assert row["stored_per_tally_cpu_s"] is None


def test_a_measured_step_row_reports_rate_span_and_rate_per_cpu() -> None:
    span = StoredSpan((98.0, 0), (108.0, 30_000))
    row = _row(span, tally_cores=1.5)
    assert row["stored_events_per_s"] == 3_000
    assert row["stored_span_s"] == 10.0
    assert row["stored_per_tally_cpu_s"] == 2_000
    assert stored_text(span) == "3,000/s (over 10.0 s)"
