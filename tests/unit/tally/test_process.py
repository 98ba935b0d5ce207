"""The interpreter settings each entry point applies (``tally.process``)."""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from tally import process
from tally.process import thread_nice, tune_process
from tally.settings import Settings


def test_tune_process_sets_the_switch_interval_and_the_gc_threshold() -> None:
    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    try:
        tune_process(Settings(switch_interval_ms=0.5, gc_threshold=60_000))  # type: ignore[call-arg]
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert gc.get_threshold()[0] == 60_000
        tune_process(Settings())  # type: ignore[call-arg]
        assert sys.getswitchinterval() == pytest.approx(0.001)  # the default: 1 ms
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(interval)


def test_a_switch_interval_out_of_range_names_the_setting() -> None:
    for bad in (0, -1, 101):
        with pytest.raises(ValidationError, match="switch_interval_ms"):
            Settings(switch_interval_ms=bad)  # type: ignore[call-arg]


def _in_a_thread(fn: Callable[[], object]) -> tuple[object, int, int]:
    """``fn()`` on a new thread: its result, then that thread's nice value and the nice value
    of a thread it starts afterwards (read by each thread itself)."""
    got: dict[str, object] = {}

    def child() -> None:
        got["child"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def run() -> None:
        got["result"] = fn()
        got["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        t = threading.Thread(target=child)
        t.start()
        t.join()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return got["result"], int(got["nice"]), int(got["child"])  # type: ignore[call-overload]


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="nice values per thread are Linux's"
)


@linux_only
def test_thread_nice_sets_the_calling_thread_and_the_threads_it_starts() -> None:
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    target = min(own + 3, 19)  # lowering a priority is always permitted
    result, nice, child = _in_a_thread(lambda: thread_nice(target))
    assert result is True
    assert (nice, child) == (target, target)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own  # not this thread


@linux_only
def test_thread_nice_zero_leaves_the_thread_as_it_is() -> None:
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert _in_a_thread(lambda: thread_nice(0)) == (False, own, own)


@linux_only
def test_a_refused_priority_is_logged_once_and_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(which: int, who: int, prio: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    monkeypatch.setattr(process, "_nice_refused", False)
    caplog.set_level(logging.INFO, logger="tally.process")
    assert thread_nice(-10) is False
    assert thread_nice(-10) is False
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1
    assert "nice -10" in refusals[0] and "CAP_SYS_NICE" in refusals[0]
    assert "flush_thread_nice" in refusals[0]


def test_flush_thread_nice_out_of_range_names_the_setting() -> None:
    for bad in (-21, 20):
        with pytest.raises(ValidationError, match="flush_thread_nice"):
            Settings(flush_thread_nice=bad)  # type: ignore[call-arg]
    assert Settings().flush_thread_nice == -10  # type: ignore[call-arg]
