"""An experiment, not a supported layout: `tally run` with ``P`` events partitions and, beside
it, ``W`` more worker processes (`tally worker`) that reach the embedded broker and chDB through
the main process (its store server, the same one the API child uses). It measures how much more
`tally run` would store if its worker were not one flush thread under one interpreter lock
(docs/performance.md, "The plateau is one flush thread").

    python -m benchmarks.workers 1 0 90000 30    # partitions, extra workers, offered/s, seconds
    python -m benchmarks.workers 2 1 90000 30    # the same load, a second worker process

The load is sent with ``wait=broker`` (an answer does not wait for storage: a worker of another
process cannot wake the main process's wait board, so ``wait=stored`` is not served in this
layout), 64 clients, the harness's 4 tenants, events and 5 meters. One line of JSON: accepted
and stored events/s over the load and the CPU (cores) of the main process, the API child and
the extra workers. The extra workers get their settings from the API child's environment
(``/proc/<pid>/environ``: the store server's URL, the broker, the topic generation), each with
its own data directory for its dedupe index.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchmarks.target as target
from benchmarks.loadgen import StepSpec
from benchmarks.modes import load_rig
from benchmarks.target import (
    EmbeddedTally,
    cpu_s,
    tally_pids,
)

CLIENTS = 64


def _tally_env_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [x.decode().split("=", 1) for x in f.read().split(b"\0") if b"=" in x]
    return {k: v for k, v in pairs if k.startswith("TALLY_")}


def main(argv: list[str]) -> None:
    partitions, extra, rate, seconds = int(argv[0]), int(argv[1]), float(argv[2]), float(argv[3])
    orig = target.tally_env

    def env(admin_token: str) -> dict[str, str]:
        return {**orig(admin_token), "TALLY_EVENTS_PARTITIONS": str(partitions)}

    target.tally_env = env
    work = Path(tempfile.mkdtemp(prefix="tally-workers-"))
    t = EmbeddedTally(work / "data", work / "tally.log")
    t.start()
    workers: list[subprocess.Popen[bytes]] = []
    try:
        url = t.url
        api = [p for p in tally_pids(t.pid)[1:] if "TALLY_CLICKHOUSE_URL" in _tally_env_of(p)]
        if extra and not api:
            raise SystemExit("no API child found (is TALLY_EMBEDDED_PROCESSES=split?)")
        base = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        for n in range(extra):
            wenv = {
                **base,
                **_tally_env_of(api[0]),
                "TALLY_DATA_DIR": str(work / f"worker-{n}"),
                "TALLY_WORKER_METRICS_PORT": "0",
            }
            log = open(work / f"worker-{n}.log", "wb")  # kept open while the child runs
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "runtime", "worker"],
                    env=wenv,
                    cwd=target.REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        if workers:
            time.sleep(12)  # the group's rebalance hands them their partitions
        _tenants, gen, poller = load_rig(url, t.admin_token, "workers")
        gen.run(StepSpec("warm", rate, CLIENTS, 6, "broker", [url], 0))
        pids = [t.pid, *api, *(w.pid for w in workers)]
        c0, w0 = [cpu_s(p) or 0.0 for p in pids], time.monotonic()
        st = gen.run(StepSpec("load", rate, CLIENTS, seconds, "broker", [url], 5))
        dt = time.monotonic() - w0
        cores = [round(((cpu_s(p) or 0.0) - a) / dt, 2) for p, a in zip(pids, c0, strict=True)]
        time.sleep(5)  # the last samples of the stored total
        span = poller.step_span(st.window_start, st.ended)
        poller.stop()
        out = {
            "partitions": partitions,
            "extra_workers": extra,
            "accepted_per_s": round(st.accepted_per_s),
            "stored_per_s": round(span.rate) if span is not None else None,
            "errors": st.error_rate,
            "cores_main_api_workers": cores,
        }
        print(json.dumps(out), flush=True)
    finally:
        for w in workers:
            w.terminate()
            w.wait(30)
        t.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
