"""The interpreter settings each entry point applies (``tally.process``)."""

from __future__ import annotations

import gc
import sys

import pytest
from pydantic import ValidationError

from tally.process import tune_process
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
