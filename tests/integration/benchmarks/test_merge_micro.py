"""``python -m benchmarks.merge_micro`` measures the store's merges per event on real chDB (never
checked for speed: the figures depend on the machine); its options reach the store."""

from __future__ import annotations

import re

import pytest

from benchmarks.merge_micro import _number, _options
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


@pytest.mark.parametrize("arg", ["--stop", "--stops=events", "--bogus=1"])
def test_unknown_or_bare_options_are_refused(arg: str) -> None:
    with pytest.raises(SystemExit, match="unknown option"):
        _options([arg])


@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [("links", "x", int), ("links", "0", int), ("links", "1.5", int), ("--base", "-1", int)],
)
def test_numbers_are_refused_in_words(name: str, text: str, kind: type[int] | type[float]) -> None:
    with pytest.raises(SystemExit, match=f"{name} must be a positive number"):
        _number(name, text, kind)


@pytest.mark.parametrize("text", ["soon", "-0.5", "nan", "inf"])
def test_pauses_must_be_finite_and_not_negative(text: str) -> None:
    with pytest.raises(SystemExit, match="--gap must be a non-negative number"):
        _number("--gap", text, float, zero_ok=True)


def test_zero_pauses_are_taken() -> None:
    assert _number("--gap", "0.00", float, zero_ok=True) == 0.0
