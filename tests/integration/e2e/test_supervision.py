"""The embedded broker child of `tally run` dies (kill -9): `tally run` notices, restarts it on a
new topic generation and a client that retries unacknowledged batches ends with exact totals.
A broker that may not be restarted makes `tally run` exit non-zero with a clear message."""

from __future__ import annotations

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
    assert_matches,
    broker_pids,
    create_meters,
    create_tenant,
    query_all,
    start_embedded,
    wait_log,
)

pytestmark = pytest.mark.chaos


def _broker_pid(proc_pid: int, not_in: frozenset[int] | set[int] = frozenset()) -> int:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        kids = [p for p in broker_pids(proc_pid) if p not in not_in]
        if kids:
            return kids[0]
        time.sleep(0.2)
    raise AssertionError("no (new) broker child appeared")


def test_broker_child_killed_twice_while_a_client_retries(tmp_path: Path) -> None:
    log = tmp_path / "tally.log"
    proc, url = start_embedded(tmp_path / "data", log)
    try:
        key = create_tenant(url, "acme")
        create_meters(url, key)
        wl = Workload(seed=23, n_unique=2400).generate()
        batches = [wl.events[i : i + 100] for i in range(0, len(wl.events), 100)]
        client = RetryingClient(key, lambda: url)
        sender = BackgroundSender(client, batches)
        assert proc.proc is not None
        killed: set[int] = set()
        for i, at in enumerate((len(batches) // 3, 2 * len(batches) // 3)):
            sender.wait_sent(at)
            pid = _broker_pid(proc.proc.pid, killed)
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
            wait_log(proc, "embedded broker restarted", count=i + 1)
        sender.finish()
        assert client.failures > 0  # the kills were felt: some batches had to be retried
        # wait=stored: every acknowledged batch is queryable; every batch was acknowledged
        assert_matches(query_all(url, key, wl), wl.truth())
        text = log.read_text(errors="replace")
        assert text.count("exited with code -9; restarting it with a new topic generation") == 2
        assert "(generation 3)" in text
        assert httpx.get(url + "/readyz", timeout=10).status_code == 200
        assert proc.terminate() == 0, proc.tail()
    finally:
        if proc.alive():
            proc.kill9()


def test_broker_that_may_not_restart_stops_tally_run_with_a_clear_error(tmp_path: Path) -> None:
    log = tmp_path / "tally.log"
    proc, _url = start_embedded(tmp_path / "data", log, TALLY_BROKER_MAX_RESTARTS="0")
    try:
        assert proc.proc is not None
        os.kill(_broker_pid(proc.proc.pid), signal.SIGKILL)
        proc.proc.wait(120)
        assert proc.terminate() == 1, proc.tail()
        text = log.read_text(errors="replace")
        assert "error: the embedded broker died 1 times within" in text, proc.tail()
        assert "broker_max_restarts=0" in text
    finally:
        if proc.alive():
            proc.kill9()
