"""``python -m benchmarks.store_micro`` times every store call of a flush on real chDB (never
checked for speed: the figures depend on the machine), on links that chain and carry rows."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.store_micro import prepared_links

REPO = Path(__file__).resolve().parents[3]


def test_prepared_links_chain_and_carry_rows(tmp_path: Path) -> None:
    links = prepared_links(3, 1000, tmp_path)
    assert len(links) == 3
    assert links[0].first == 0
    for before, after in itertools.pairwise(links):
        assert after.first == before.last + 1
    for k in links:
        assert k.prepared and k.events.num_rows > 0 and k.usage.num_rows > 0


def test_store_micro_times_every_call() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.store_micro", "3", "1000"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("3 links of ")
    assert re.fullmatch(
        r"  active parts of usage_minute after a link: median \d+, max \d+", lines[-1]
    )
    timed: dict[str, float] = {}
    for line in lines[1:-1]:
        m = re.fullmatch(r"  (.+): ([\d.]+) / ([\d.]+)", line)
        assert m is not None, line
        timed[m.group(1)] = float(m.group(2))
    assert set(timed) == {
        "ledger insert (worker's settings)",
        "ledger insert (store defaults)",
        "commit insert",
        "read of progress and claims (full)",
        "read of progress and claims (since the link's read before)",
    }
    assert all(v > 0 for v in timed.values())
