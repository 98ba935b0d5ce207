"""`tally run` in one layout (``TALLY_EMBEDDED_PROCESSES``) under a fixed load, for back-to-back
comparisons of ``split`` and ``single`` (docs/performance.md, "`tally run` in two processes").

    python -m benchmarks.modes split 30 40000 64     # mode, seconds, offered events/s, clients
    python -m benchmarks.modes split 30 34000 64 --poll   # plus a query loop like the probe
    python -m benchmarks.modes split 30 28000 64 --ramp=90:128000   # after 90 s of overload
    python -m benchmarks.modes split 30 46000 64 --windows=8:15  # then 8 windows of 15 s

One JSON line: stored events/s and answer latency under the load (4 tenants, the harness's
events and 5 meters, 1000-event batches, 2 generator processes), then (after any windows) one
sequential client for 20 s; CPU of the main process, the API child and the broker over the
load, of the load generator's processes, and the machine's busy cores (all of it, from
/proc/stat: how close the load is to the machine's cores); the worker's flushes per second and
their mean time (``tally_worker_flush_seconds`` from /metrics: one commit
attempt, the store's calls). ``--poll``: during the load, one client also asks a usage query in
a loop with 10 ms pauses, as the full run's freshness probe does at half load
(``benchmarks.run``); its query latency and rate are reported. ``--ramp=S:R``: first S seconds
at R offered events/s (the full run's half load follows its ramp to overload and meets a store
of the ramp's volume); its accepted rate is reported.
``--windows=K:S``: after the load, K more windows of S seconds at the same rate, each reported
on its own (answers, stored total, flushes, the main process's cores: Python, the store's
merges, other native threads; the machine's busy cores): how the answers move as the store
grows under a steady load.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

import benchmarks.target as target
from benchmarks.loadgen import GenConfig, LoadGenerator, StepSpec, Tenant
from benchmarks.target import (
    CpuMeter,
    EmbeddedTally,
    StoredPoller,
    Totals,
    broker_pids,
    cpu_s,
    create_tenants,
    ensure_meters,
    probe_query,
    tally_pids,
)


def _flushes(url: str) -> tuple[float, float]:
    """The worker's flushes so far: (count, seconds in them), from /metrics
    (``tally_worker_flush_seconds``; the API re-exports the worker's series in split mode)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    got = {"_count": 0.0, "_sum": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "tally_worker_flush_seconds":
            for sample in family.samples:
                suffix = sample.name.removeprefix(family.name)
                if suffix in got:
                    got[suffix] += sample.value
    return got["_count"], got["_sum"]


def _q(lat: list[float], f: float) -> int:
    return round(lat[min(len(lat) - 1, int(f * len(lat)))] * 1000) if lat else -1


class QueryLoop:
    """One client asking one customer's usage of the last and next hour, 10 ms between
    answers (the freshness probe's polling); latencies of the answers while it runs."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.params = probe_query(url, "modes-probe", datetime.now(UTC))
        self.headers = {"Authorization": f"Bearer {key}"}
        self.latencies: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modes-queries", daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self._stop.is_set():
                started = time.perf_counter()
                r = c.get(self.url, params=self.params, headers=self.headers)
                if r.status_code == 200:
                    self.latencies.append(time.perf_counter() - started)
                else:
                    self.failed += 1
                self._stop.wait(0.01)

    def start(self) -> QueryLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def load_rig(
    url: str, admin_token: str, name: str
) -> tuple[list[Tenant], LoadGenerator, StoredPoller]:
    """The fixed load's tenants (4, with the workload's meters), its generator (1000-event
    batches, 2 processes) and a running poller of their stored total."""
    tenants = create_tenants(url, admin_token, 4, f"{name[:1]}{int(time.time())}")
    for x in tenants:
        ensure_meters(url, x.key)
    gen = LoadGenerator(
        GenConfig(tenants, 1000, 1.1, 0.02, 0.01, 1000, 7, f"{name}{time.time():.0f}"), 2
    )
    return tenants, gen, StoredPoller(Totals(url, tenants), 1.0).start()


def pair_option(
    argv: list[str], name: str, example: str, whole_first: bool = False
) -> tuple[float, float] | None:
    """The value of ``--name=A:B`` (given at most once) as two positive numbers, the first a
    whole one if ``whole_first``; None when absent."""
    given = [a.removeprefix(f"--{name}=") for a in argv if a.startswith(f"--{name}=")]
    if len(given) > 1:
        raise SystemExit(f"--{name}= is given once")
    if not given:
        return None
    try:
        a, b = (float(x) for x in given[0].split(":"))
    except ValueError:
        raise SystemExit(f"--{name}= takes two numbers, e.g. --{name}={example}") from None
    if not (a > 0 and b > 0) or (whole_first and not a.is_integer()):
        what = "a whole number and a number, both" if whole_first else "two numbers"
        raise SystemExit(f"--{name}= takes {what} above 0, e.g. --{name}={example}")
    return a, b


def _window(
    gen: LoadGenerator, url: str, pid: int, rate: float, clients: int, seconds: float, total: Totals
) -> dict[str, Any]:
    """One window of the steady load after the measured one, reported on its own."""
    cpu, w0, f0 = CpuMeter(pid), time.monotonic(), _flushes(url)
    st = gen.run(StepSpec("window", rate, clients, seconds, None, [url], 0))
    dt = time.monotonic() - w0
    f1 = _flushes(url)
    cores = cpu.cores()
    lat = sorted(st.latencies_s)
    with httpx.Client(timeout=60) as c:
        stored = total.read(c)
    return {
        "stored_total": stored,
        "accepted_per_s": round(st.accepted_per_s),
        "load_p50_ms": _q(lat, 0.5),
        "load_p99_ms": _q(lat, 0.99),
        "flushes_per_s": round((f1[0] - f0[0]) / dt, 1),
        "flush_mean_ms": round(1000 * (f1[1] - f0[1]) / max(1.0, f1[0] - f0[0]), 1),
        "main_python_merges_native_cores": [
            round(cores.get(k) or 0.0, 2)
            for k in ("main_python_cores", "main_merge_cores", "main_native_cores")
        ],
        "machine_busy_cores": round(cores["machine_busy_cores"] or 0.0, 2),
    }


def main(argv: list[str]) -> None:
    poll = "--poll" in argv
    ramp = pair_option(argv, "ramp", "90:128000")
    windows = pair_option(argv, "windows", "8:15", whole_first=True)
    argv = [a for a in argv if a != "--poll" and not a.startswith(("--ramp=", "--windows="))]
    mode, seconds, rate, clients = argv[0], float(argv[1]), float(argv[2]), int(argv[3])
    orig = target.tally_env

    def env(admin_token: str) -> dict[str, str]:
        return {**orig(admin_token), "TALLY_EMBEDDED_PROCESSES": mode}

    target.tally_env = env
    work = Path(tempfile.mkdtemp(prefix=f"tally-modes-{mode}-"))
    t = EmbeddedTally(work / "data", work / "tally.log")
    t.start()
    try:
        url = t.url
        tenants, gen, poller = load_rig(url, t.admin_token, mode)

        def per() -> list[float]:
            tp = tally_pids(t.pid)
            return [
                cpu_s(tp[0]) or 0.0,
                sum(cpu_s(p) or 0.0 for p in tp[1:]),
                sum(cpu_s(p) or 0.0 for p in broker_pids(t.pid)),
            ]

        ramped = None
        if ramp is not None:
            ramped = gen.run(StepSpec("ramp", ramp[1], clients, ramp[0], None, [url], 0))
        gen.run(StepSpec("warm", rate, clients, 6, None, [url], 0))
        queries = QueryLoop(url, tenants[0].key).start() if poll else None
        p0, w0, f0 = per(), time.monotonic(), _flushes(url)
        machine = CpuMeter(None)
        st = gen.run(StepSpec("load", rate, clients, seconds, None, [url], 5))
        dt = time.monotonic() - w0
        busy = machine.cores()["machine_busy_cores"] or 0.0
        f1 = _flushes(url)
        if queries is not None:
            queries.stop()
        cores = [round((b - a) / dt, 2) for a, b in zip(p0, per(), strict=True)]
        span = poller.step_span(st.window_start, st.ended)
        stored = span.rate if span is not None else None
        lat = sorted(st.latencies_s)
        after: list[dict[str, Any]] = []
        if windows is not None:
            totals = Totals(url, tenants)
            after = [
                _window(gen, url, t.pid, rate, clients, windows[1], totals)
                for _ in range(int(windows[0]))
            ]
        seq = gen.run(StepSpec("seq", None, 1, 20, None, [url], 3))
        sl = sorted(seq.latencies_s)
        out: dict[str, Any] = {
            "mode": mode,
            "stored_per_s": round(stored) if stored is not None else None,
            "accepted_per_s": round(st.accepted_per_s),
            "errors": st.error_rate,
            "load_p50_ms": _q(lat, 0.5),
            "load_p99_ms": _q(lat, 0.99),
            "tally_cores_incl_broker": round(sum(cores), 2),
            "main_api_broker_cores": cores,
            "generator_cores": round(st.cpu_s / st.seconds, 2),
            "machine_busy_cores": round(busy, 2),
            "flushes_per_s": round((f1[0] - f0[0]) / dt, 1),
            "flush_mean_ms": round(1000 * (f1[1] - f0[1]) / max(1.0, f1[0] - f0[0]), 1),
            "seq_events_per_s": round(seq.accepted_per_s),
            "seq_p50_ms": _q(sl, 0.5),
            "seq_p99_ms": _q(sl, 0.99),
            "n_seq": len(sl),
        }
        if ramped is not None:
            out["ramp_accepted_per_s"] = round(ramped.accepted_per_s)
        if after:
            out["windows"] = after
        if queries is not None:
            ql = sorted(queries.latencies)
            out.update(
                queries_per_s=round(len(ql) / dt, 1),
                query_p50_ms=_q(ql, 0.5),
                query_p99_ms=_q(ql, 0.99),
                queries_failed=queries.failed,
            )
        print(json.dumps(out), flush=True)
        poller.stop()
        gen.close()
    finally:
        t.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
