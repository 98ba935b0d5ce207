"""``python -m benchmarks.prepare_micro`` runs the worker's prepare on disk-backed dedupe indexes
with `tally run`'s interpreter settings (never checked for speed: the figures depend on the
machine)."""

from __future__ import annotations

import re

from tally.settings import get_settings
from tests.support.modules import run_module


def test_prepare_micro_reports_each_phase_under_the_runtime_settings() -> None:
    line = run_module("benchmarks.prepare_micro", "2", "2000", "2").strip().splitlines()[-1]
    got = re.fullmatch(
        r"2 flushes of ([\d,]+) events over 2 partitions: CPU per flush \(median\): decode "
        r"[\d.]+ ms, prepare [\d.]+ ms, index [\d.]+ ms; prepare \+ index: [\d,]+ events per "
        r"CPU-second; total CPU [\d.]+ s \(collector threshold (\d+), switch interval "
        r"([\d.]+) ms\)",
        line,
    )
    assert got is not None, line
    # duplicates (client retries) are counted in the events that came in
    assert int(got.group(1).replace(",", "")) >= 2000
    settings = get_settings()
    assert int(got.group(2)) == settings.gc_threshold
    assert float(got.group(3)) == settings.switch_interval_ms
