"""Backfill with real Tally processes: across an embedded restart (a new topic generation), and a
`tally meters backfill` process killed with SIGKILL in the middle of its chunks."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.e2e.harness import (
    ADMIN_TOKEN,
    REPO,
    RetryingClient,
    create_tenant,
    start_embedded,
    tally_env,
)

pytestmark = pytest.mark.chaos

NOW = datetime.now(UTC).replace(second=0, microsecond=0)


def _events(seed: int, n: int, first: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``n`` events, some re-sending an id seen earlier (with another payload: the first copy
    counts); ``first`` collects the first copy of every id (the ground truth)."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        if first and rnd.random() < 0.2:
            old = first[rnd.choice(sorted(first))]
            ev = {**old, "properties": {"gb": rnd.randint(100, 200)}}
        else:
            ev = {
                "id": f"s{seed}-{i}",
                "type": "upload",
                "customer": f"c{rnd.randrange(3)}",
                "time": (NOW - timedelta(minutes=rnd.randrange(600)))
                .isoformat()
                .replace("+00:00", "Z"),
                "properties": {"gb": rnd.randint(1, 50)},
            }
        first.setdefault(ev["id"], ev)
        out.append(ev)
    return out


def _truth(first: dict[str, dict[str, Any]]) -> dict[str, Decimal]:
    out: dict[str, Decimal] = defaultdict(Decimal)
    for ev in first.values():
        out[ev["customer"]] += Decimal(ev["properties"]["gb"])
    return dict(out)


def _usage(url: str, key: str) -> dict[str, Decimal]:
    r = httpx.get(
        f"{url}/v1/meters/gb/usage",
        params={
            "from": (NOW - timedelta(days=1)).isoformat(),
            "to": (NOW + timedelta(days=1)).isoformat(),
            "group_by": "customer",
        },
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return {row["customer"]: Decimal(str(row["value"])) for row in r.json()["data"]}


def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runtime", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_backfill_after_an_embedded_restart_is_exact(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, url = start_embedded(data, tmp_path / "run0.log")
    first: dict[str, dict[str, Any]] = {}
    try:
        key = create_tenant(url, "acme")
        tenant = key.split("_")[1]
        client = RetryingClient(key, lambda: url)
        for i in range(0, 300, 100):  # history: before the meter exists
            client.send(_events(1 + i, 100, first))
        history = len(first)  # ids stored before the meter's markers
        r = httpx.post(
            url + "/v1/meters",
            json={
                "slug": "gb",
                "event_type": "upload",
                "aggregation": "sum",
                "value_property": "$.gb",
            },
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert r.status_code == 201, r.text
        client.send(_events(50, 200, first))  # counted by the stream of generation 1
        proc.kill9()  # acknowledged = stored (wait=stored); the broker's memory is gone
        proc, url = start_embedded(data, tmp_path / "run1.log")  # generation 2
        client.send(_events(60, 200, first))  # the meter applies to all of generation 2
        env = tally_env()
        out = _cli(
            ["meters", "backfill", "gb", "--tenant", tenant, "--data-dir", str(data)],
            env | {"TALLY_ADMIN_TOKEN": ADMIN_TOKEN},
        )
        assert out.returncode == 0, out.stderr + out.stdout
        assert "done: run" in out.stdout and "(new)" in out.stdout
        assert f"{history} events scanned" in out.stdout, out.stdout
        assert _usage(url, key) == _truth(first)
        client.send(_events(70, 100, first))  # more duplicates of history and new events
        assert _usage(url, key) == _truth(first)
    finally:
        proc.terminate()


def test_kill9_of_a_backfill_process_mid_run_then_resume(
    tmp_path: Path, broker: Any, topic: str, unique: str
) -> None:
    from clickhouse.backfill import BackfillStore
    from clickhouse.store import Store
    from streams.backfill import BackfillRunner
    from tests.integration.streams.history import make_history
    from tests.support.chdb_http import start_server, stop_server

    bridge, ch_url = start_server(tmp_path / "ch")
    db = f"bf_{unique}"
    store = Store.open(ch_url, db)
    cli: subprocess.Popen[bytes] | None = None
    try:
        store.migrate()
        h = make_history(store, n=2400)
        bs = BackfillStore(store)
        previous = BackfillRunner(bs, h.meter, live=None, chunk_events=500).run()
        assert h.totals() == h.truth()
        env = tally_env(
            TALLY_KAFKA_BOOTSTRAP=broker.bootstrap,
            TALLY_CLICKHOUSE_URL=ch_url,
            TALLY_CLICKHOUSE_DATABASE=db,
            TALLY_EVENTS_TOPIC=topic,  # the live topic; the meter's is an older generation
            TALLY_BACKFILL_CHUNK_EVENTS="20",
            TALLY_BACKFILL_LEASE_S="20",
        )
        args = ["meters", "backfill", "gb", "--tenant", h.tenant]
        log = open(tmp_path / "cli.log", "wb")
        cli = subprocess.Popen(
            [sys.executable, "-m", "runtime", *args],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        run = None
        while time.monotonic() < deadline:
            runs = [r for r in bs.list_runs(h.tenant, h.meter.id) if r.run_id != previous.run_id]
            if runs and runs[-1].chunks >= 3:
                run = runs[-1]
                break
            assert cli.poll() is None, (tmp_path / "cli.log").read_text()
            time.sleep(0.05)
        assert run is not None, "the backfill process never stored 3 chunks"
        cli.kill()  # SIGKILL, mid-run
        cli.wait(30)
        log.close()
        killed = bs.get_run(h.tenant, h.meter.id, run.run_id)
        assert killed is not None and killed.state == "running"
        assert killed.chunks < previous.events_scanned // 20  # really in the middle
        assert h.totals() == h.truth()  # the previous run is still the visible one
        assert bs.visible_run(h.tenant, h.meter.id) == previous.run_id
        held = _cli(args, env)  # its lease (20 s) has not expired: 409-style refusal
        assert held.returncode == 1 and "already running" in held.stderr, held.stderr
        assert run.run_id in held.stderr
        assert h.totals() == h.truth()
        time.sleep(max(0.0, killed.heartbeat_ms / 1000 + 20.5 - time.time()))
        done = _cli(args, env)
        assert done.returncode == 0, done.stderr + done.stdout
        assert f"done: run {run.run_id} (resumed)" in done.stdout, done.stdout
        assert h.totals() == h.truth()
        final = bs.get_run(h.tenant, h.meter.id, run.run_id)
        assert final is not None and final.state == "complete"
        assert final.events_scanned == previous.events_scanned
        cps = bs.checkpoints(h.tenant, h.meter.id, run.run_id)
        assert [c.chunk for c in cps] == list(range(1, len(cps) + 1))
        assert sum(c.scanned for c in cps) == previous.events_scanned
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
        store.close()
        stop_server(bridge)
