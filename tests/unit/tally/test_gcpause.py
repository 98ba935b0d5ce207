from __future__ import annotations

import gc
import threading

from tally.gcpause import gc_paused, tune_gc


def test_pauses_and_restores() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_nested_and_failing_blocks_restore_once_the_last_ends() -> None:
    try:
        with gc_paused():
            with gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the outer block still runs
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_concurrent_blocks() -> None:
    inside = threading.Barrier(2)
    leave = threading.Event()
    seen: list[bool] = []

    def other() -> None:
        with gc_paused():
            inside.wait()
            leave.wait(10)
        seen.append(gc.isenabled())

    t = threading.Thread(target=other)
    t.start()
    with gc_paused():
        inside.wait()
    assert not gc.isenabled()  # the other thread's block is still running
    leave.set()
    t.join(10)
    assert seen == [True] and gc.isenabled()


def test_tune_gc_raises_the_young_threshold_and_freezes_start_up_objects() -> None:
    before = gc.get_threshold()
    try:
        tune_gc(0)  # 0 keeps Python's thresholds
        assert gc.get_threshold() == before
        tune_gc(50_000)
        assert gc.get_threshold() == (50_000, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
