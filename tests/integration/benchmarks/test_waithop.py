"""``python -m benchmarks.waithop`` runs both hops and reports every figure (never checked for
speed: the figures depend on the machine)."""

from __future__ import annotations

import json

from tests.support.modules import run_module


def test_waithop_benchmark_measures_both_hops() -> None:
    out = run_module("benchmarks.waithop", "0.5", "4", "1")
    lines = [json.loads(x) for x in out.splitlines() if not x.startswith("#")]
    runs = [x for x in lines if "hop" in x]
    assert {(x["hop"], x["shape"]) for x in runs} == {
        (h, s) for h in ("http", "socket") for s in ("pending", "stored")
    }
    for x in runs:
        assert x["waits"] > 0 and x["waits_per_s"] > 0
        assert x["client_cpu_us_per_wait"] >= 0 and x["server_cpu_us_per_wait"] >= 0
    summaries = {x["shape"]: x for x in lines if "socket_over_http_median" in x}
    assert set(summaries) == {"pending", "stored"}
