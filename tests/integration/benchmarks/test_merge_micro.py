"""``python -m benchmarks.merge_micro`` measures the store's merges per event on real chDB (never
checked for speed: the figures depend on the machine); its options reach the store."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from benchmarks.merge_micro import app
from tests.support.modules import run_module


def _parts(out: str) -> dict[str, tuple[int, int, int]]:
    """Per table: active parts, rows, merge_selector_base."""
    found = re.findall(
        r"^  (events|usage_minute): (\d+) active parts, ([\d,]+) rows, merge_selector_base (\d+)$",
        out,
        re.M,
    )
    return {t: (int(c), int(r.replace(",", "")), int(b)) for t, c, r, b in found}


def test_merges_stopped_leave_a_part_per_link() -> None:
    out = run_module(
        "benchmarks.merge_micro", "3", "1000", "--stop=events,usage_minute", "--gap=0", "--settle=0"
    )
    lines = out.splitlines()
    assert re.fullmatch(
        r"3 links, [\d,]+ kept events; merges stopped: events,usage_minute; "
        r"merge_selector_base: as migrated",
        lines[0],
    )
    cpu = re.fullmatch(
        r"  CPU per event: ([\d.]+) us while written, ([\d.]+) us after, ([\d.]+) us in all",
        lines[1],
    )
    assert cpu is not None and float(cpu.group(1)) > 0
    parts = _parts(out)
    # no merge ran: each commit wrote one part of usage_minute, each ledger insert one part per
    # month of ingestion it holds (one, unless the run crosses a month's end)
    assert parts["usage_minute"][0] == 3
    assert parts["events"][0] >= 3
    kept = re.search(r"([\d,]+) kept events", lines[0])
    assert kept is not None
    kept_events = int(kept.group(1).replace(",", ""))
    assert parts["events"][1] == kept_events  # every kept event is one ledger row
    assert parts["events"][2] == parts["usage_minute"][2] == 10  # migration 080


def test_base_option_reaches_the_tables() -> None:
    out = run_module("benchmarks.merge_micro", "2", "500", "--base=7", "--gap=0", "--settle=0")
    assert "merge_selector_base: 7" in out.splitlines()[0]
    parts = _parts(out)
    assert set(parts) == {"events", "usage_minute"}
    assert parts["events"][2] == parts["usage_minute"][2] == 7


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--stop"], "--stop"),  # a bare option
        (["--stops=events"], "--stops"),  # an unknown one
        (["--bogus=1"], "--bogus"),
        (["--stop=events,bogus"], "--stop"),  # a table it does not know
        (["x"], "links"),
        (["0"], "links"),
        (["1.5"], "links"),
        (["1", "0"], "per_link"),
        (["--base=-1"], "--base"),
        (["--gap=soon"], "--gap"),
        (["--gap=-0.5"], "--gap"),
        (["--gap=nan"], "--gap"),
        (["--gap=inf"], "--gap"),
    ],
)
def test_bad_arguments_are_refused_naming_them(args: list[str], named: str) -> None:
    got = CliRunner().invoke(app, args, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert got.exit_code == 2, got.output  # refused before anything runs
    assert named in got.output


def test_zero_pauses_are_taken() -> None:
    out = run_module("benchmarks.merge_micro", "1", "200", "--gap=0.00", "--settle=0")
    assert out.startswith("1 links, ")
