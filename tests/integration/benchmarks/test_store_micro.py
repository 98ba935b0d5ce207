"""``python -m benchmarks.store_micro`` times every store call of a flush on real chDB (never
checked for speed: the figures depend on the machine), on links that chain and carry rows."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from benchmarks.store_micro import prepared_links
from tests.support.modules import run_module


def test_prepared_links_chain_and_carry_rows(tmp_path: Path) -> None:
    links = prepared_links(3, 1000, tmp_path)
    assert len(links) == 3
    assert links[0].first == 0
    for before, after in itertools.pairwise(links):
        assert after.first == before.last + 1
    for k in links:
        assert k.prepared and k.events.num_rows > 0 and k.usage.num_rows > 0


@pytest.mark.parametrize("stop_merges", [False, True], ids=["merges-running", "merges-stopped"])
def test_store_micro_times_every_call(stop_merges: bool) -> None:
    args = ["3", "1000"] + (["--stop-merges"] if stop_merges else [])
    lines = run_module("benchmarks.store_micro", *args).splitlines()
    assert lines[0].startswith("3 links of ")
    merges = "stopped" if stop_merges else "running"
    assert f"merges {merges}; per call: wall ms median / p90, CPU ms median:" in lines[0]
    assert re.fullmatch(
        r"  active parts of usage_minute after a link: median \d+, max \d+", lines[-1]
    )
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for line in lines[1:-1]:
        m = re.fullmatch(r"  (.+): ([\d.]+) / ([\d.]+) ms wall, ([\d.]+) ms CPU", line)
        assert m is not None, line
        wall[m.group(1)] = float(m.group(2))
        cpu[m.group(1)] = float(m.group(4))
    assert set(wall) == {
        "ledger insert (worker's settings)",
        "ledger insert (store defaults)",
        "commit insert",
        "read of progress and claims (full)",
        "read of progress and claims (since the link's read before)",
    }
    assert set(cpu) == set(wall)
    assert all(v > 0 for v in wall.values())
    assert all(v > 0 for v in cpu.values())  # every call costs the process some CPU
    if stop_merges:  # no merge ran: a part per link, so after 3 links the median is 2 or more
        parts = re.search(r"median (\d+)", lines[-1])
        assert parts is not None and int(parts.group(1)) >= 2
