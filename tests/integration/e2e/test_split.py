"""`tally run` in its default split mode (``runtime.split``): the API in a child process, the
worker and chDB in the main one. The guarantees of the split, with real processes:

- kill -9 of `tally run` leaves no child behind (the API and broker children die with it, nothing
  holds the data directory) and a restart on the same directory is exact;
- a killed API child is restarted on the same URL (producing to the broker generation of the
  moment, after a broker restart) while a client retries, and the totals are exact; an API child that may not be restarted stops `tally run` with exit code 1 and a clear
  message (never a half-alive Tally);
- SIGTERM stops both processes in order, exit code 0;
- `TALLY_EMBEDDED_PROCESSES=single` (the old one-process layout) still runs and counts exactly.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.e2e.harness import (
    BackgroundSender,
    RetryingClient,
    Workload,
    api_pids,
    assert_matches,
    broker_pids,
    create_meters,
    create_tenant,
    query_all,
    start_embedded,
    wait_log,
)

pytestmark = pytest.mark.chaos


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _one(fn: object, pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = fn(pid)  # type: ignore[operator]
        if pids:
            return int(pids[0])
        time.sleep(0.2)
    raise AssertionError(f"no child found by {fn}")


def test_kill9_of_tally_run_leaves_no_children_and_restart_is_exact(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, url = start_embedded(data, tmp_path / "run0.log")
    try:
        assert proc.proc is not None
        api, broker = _one(api_pids, proc.proc.pid), _one(broker_pids, proc.proc.pid)
        key = create_tenant(url, "acme")
        create_meters(url, key)
        wl = Workload(seed=5, n_unique=1500).generate()
        half = len(wl.events) // 2
        client = RetryingClient(key, lambda: url)
        for i in range(0, half, 100):
            client.send(wl.events[i : min(i + 100, half)])
        proc.kill9()
        deadline = time.monotonic() + 30
        while _alive(api) or _alive(broker):
            assert time.monotonic() < deadline, "children of the killed tally run are still alive"
            time.sleep(0.1)
        proc, url = start_embedded(data, tmp_path / "run1.log")
        for i in range(half, len(wl.events), 100):
            client.send(wl.events[i : i + 100])
        # the first half again (clients retry what they are unsure of): counted once
        for i in range(0, half, 100):
            client.send(wl.events[i : min(i + 100, half)])
        assert_matches(query_all(url, key, wl), wl.truth())
        assert proc.terminate() == 0, proc.tail()
    finally:
        if proc.alive():
            proc.kill9()


def test_killed_broker_then_api_child_are_restarted_while_a_client_retries(tmp_path: Path) -> None:
    log = tmp_path / "tally.log"
    proc, url = start_embedded(tmp_path / "data", log)
    try:
        assert proc.proc is not None
        key = create_tenant(url, "acme")
        create_meters(url, key)
        wl = Workload(seed=11, n_unique=4000).generate()
        batches = [wl.events[i : i + 100] for i in range(0, len(wl.events), 100)]
        client = RetryingClient(key, lambda: url)
        sender = BackgroundSender(client, batches)
        sender.wait_sent(len(batches) // 4)
        # the broker first: the API child restarted below must produce to the new generation
        os.kill(_one(broker_pids, proc.proc.pid), signal.SIGKILL)
        wait_log(proc, "embedded broker restarted")
        sender.wait_sent(len(batches) // 2)
        old = _one(api_pids, proc.proc.pid)
        os.kill(old, signal.SIGKILL)
        wait_log(proc, "API process restarted")
        assert _one(api_pids, proc.proc.pid) != old
        sender.finish()
        assert client.failures > 0  # the kill was felt
        assert_matches(query_all(url, key, wl), wl.truth())
        assert httpx.get(url + "/readyz", timeout=10).status_code == 200
        assert proc.terminate() == 0, proc.tail()
    finally:
        if proc.alive():
            proc.kill9()


def test_api_child_that_may_not_restart_stops_tally_run(tmp_path: Path) -> None:
    log = tmp_path / "tally.log"
    proc, _url = start_embedded(tmp_path / "data", log, TALLY_API_MAX_RESTARTS="0")
    try:
        assert proc.proc is not None
        broker = _one(broker_pids, proc.proc.pid)
        os.kill(_one(api_pids, proc.proc.pid), signal.SIGKILL)
        proc.proc.wait(120)
        assert proc.terminate() == 1, proc.tail()
        text = log.read_text(errors="replace")
        assert "error: the API process died 1 times within" in text, proc.tail()
        assert "api_max_restarts=0" in text
        deadline = time.monotonic() + 30
        while _alive(broker):
            assert time.monotonic() < deadline, "the broker outlived tally run"
            time.sleep(0.1)
    finally:
        if proc.alive():
            proc.kill9()


def test_single_mode_keeps_one_process_and_counts_exactly(tmp_path: Path) -> None:
    """``TALLY_EMBEDDED_PROCESSES=single``, the old layout: no API child, the run file written,
    every event counted once (retries included), SIGTERM -> exit 0."""
    data = tmp_path / "data"
    proc, url = start_embedded(data, tmp_path / "tally.log", TALLY_EMBEDDED_PROCESSES="single")
    try:
        assert proc.proc is not None
        assert api_pids(proc.proc.pid) == []
        assert json.loads((data / "run.json").read_text())["url"] == url
        key = create_tenant(url, "acme")
        create_meters(url, key)
        wl = Workload(seed=7, n_unique=800).generate()
        client = RetryingClient(key, lambda: url)
        for i in range(0, len(wl.events), 100):
            client.send(wl.events[i : i + 100])
        client.send(wl.events[:100])  # a retried batch: counted once
        assert_matches(query_all(url, key, wl), wl.truth())
        assert proc.terminate() == 0, proc.tail()
    finally:
        if proc.alive():
            proc.kill9()
