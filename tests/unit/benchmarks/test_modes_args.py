"""``benchmarks.modes``' two-number options (``--ramp=S:R``, ``--windows=K:S``)."""

from __future__ import annotations

import pytest

from benchmarks.modes import pair_option


def test_absent_is_none() -> None:
    assert pair_option(["split", "30", "46000", "64"], "ramp", "90:128000") is None


def test_two_numbers() -> None:
    argv = ["split", "30", "46000", "64", "--ramp=90:128000", "--windows=8:15"]
    assert pair_option(argv, "ramp", "90:128000") == (90.0, 128000.0)
    assert pair_option(argv, "windows", "8:15") == (8.0, 15.0)


def test_given_twice_is_refused() -> None:
    with pytest.raises(SystemExit, match="given once"):
        pair_option(["--ramp=1:2", "--ramp=3:4"], "ramp", "90:128000")


@pytest.mark.parametrize("value", ["90", "90:", "a:b", "1:2:3"])
def test_malformed_names_the_option(value: str) -> None:
    with pytest.raises(SystemExit, match="--windows= takes two numbers"):
        pair_option([f"--windows={value}"], "windows", "8:15")


@pytest.mark.parametrize("value", ["0:15", "2:0", "-1:15", "2.5:15"])
def test_windows_are_a_whole_count_and_a_positive_length(value: str) -> None:
    with pytest.raises(SystemExit, match="whole number and a number, both above 0"):
        pair_option([f"--windows={value}"], "windows", "8:15", whole_first=True)


def test_a_ramp_may_last_a_fraction_of_a_second_but_not_zero() -> None:
    assert pair_option(["--ramp=0.5:1000"], "ramp", "90:128000") == (0.5, 1000.0)
    with pytest.raises(SystemExit, match="takes two numbers above 0"):
        pair_option(["--ramp=0:1000"], "ramp", "90:128000")
