"""``python -m benchmarks.waithop`` runs both hops and reports every figure (never checked for
speed: the figures depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_waithop_benchmark_measures_both_hops() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.waithop", "0.5", "4", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if not x.startswith("#")]
    runs = [x for x in lines if "hop" in x]
    assert {(x["hop"], x["shape"]) for x in runs} == {
        (h, s) for h in ("http", "socket") for s in ("pending", "stored")
    }
    for x in runs:
        assert x["waits"] > 0 and x["waits_per_s"] > 0
        assert x["client_cpu_us_per_wait"] >= 0 and x["server_cpu_us_per_wait"] >= 0
    summaries = {x["shape"]: x for x in lines if "socket_over_http_median" in x}
    assert set(summaries) == {"pending", "stored"}
