"""The main process's CPU by thread group (``benchmarks.target.split_cores``): readings made up
here, no process read."""

from __future__ import annotations

import pytest

from benchmarks.target import split_cores, thread_group


def test_threads_are_grouped_by_their_names() -> None:
    assert thread_group("python", "python") == "python"
    assert thread_group("MergeMutate", "python") == "merges"
    assert thread_group("MergeMutate12", "python") == "merges"
    for name in ("ThreadPool", "QueryPipelineEx", "BgSchPool", "rdk:main", "python3"):
        assert thread_group(name, "python") == "native"


def test_split_counts_each_threads_use_in_the_interval() -> None:
    before = {1: ("python", 10.0), 2: ("python", 4.0), 3: ("MergeMutate", 2.0), 9: ("Gone", 1.0)}
    after = {
        1: ("python", 12.0),  # +2
        2: ("python", 5.0),  # +1
        3: ("MergeMutate", 3.5),  # +1.5
        4: ("MergeMutate", 0.5),  # started meanwhile: +0.5
        5: ("ThreadPool", 1.0),  # started meanwhile: +1
    }
    cores = split_cores(before, after, "python", 2.0)
    assert cores == pytest.approx({"python": 1.5, "merges": 1.0, "native": 0.5})


def test_split_of_nothing_is_zero() -> None:
    assert split_cores({}, {}, "python", 0.0) == {"python": 0.0, "merges": 0.0, "native": 0.0}
