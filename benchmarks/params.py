"""Benchmark parameters: the full run and the ``--quick`` run (CI, under 2 minutes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass
class Params:
    # workload
    tenants: int = 4
    customers: int = 1000  # per tenant, Zipf-distributed
    zipf_s: float = 1.1
    dup_rate: float = 0.02
    late_rate: float = 0.01
    batch: int = 1000
    clients: int = 64
    procs: int = 2  # load-generator processes
    seed: int = 1
    # ingest ramp: offered load from ramp_start, times ramp_factor per step, until the stored
    # rate has not risen by >= 10 % for `patience` steps (or max_steps)
    ramp_start: float = 2000.0
    ramp_factor: float = 2.0
    max_steps: int = 8
    patience: int = 2
    step_s: float = 20.0
    warmup_s: float = 10.0
    wait: str | None = None  # ingest ?wait= for the load (None: the server's default)
    sequential_s: float = 20.0
    half_min_s: float = 20.0
    freshness_probes: int = 100
    profile_s: float = 30.0  # 0 = no profile
    # stored volume: on a fresh store (embedded), history written to these totals, then
    # queries, memory and an ingest burst
    volumes: list[int] = field(default_factory=lambda: [1_000_000, 10_000_000])
    history_days: int = 30
    query_n: int = 200  # per shape and volume
    query_warmup: int = 5
    query_budget_s: float = 40.0  # per shape: stop after this once 20 queries are measured
    burst_s: float = 20.0
    # bookkeeping
    poll_s: float = 2.0  # stored totals (tenant-wide usage queries) every poll_s seconds
    drain_timeout_s: float = 300.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Params()
QUICK = replace(
    FULL,
    tenants=2,
    customers=200,
    clients=16,
    ramp_start=4000.0,
    ramp_factor=3.0,
    max_steps=2,
    patience=1,
    step_s=4.0,
    warmup_s=1.5,
    sequential_s=2.5,
    half_min_s=2.5,
    freshness_probes=5,
    profile_s=3.0,
    volumes=[80_000],
    query_n=6,
    query_warmup=1,
    burst_s=2.0,
    poll_s=0.5,
    drain_timeout_s=120.0,
)
