"""kill -9 at any moment: after recovery the totals equal the ground truth exactly."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.e2e.harness import (
    RetryingClient,
    TallyProcess,
    Workload,
    assert_matches,
    create_meters,
    create_tenant,
    query_all,
    start_embedded,
    tally_env,
    wait_http,
)

pytestmark = pytest.mark.chaos


def _send_all(client: RetryingClient, wl: Workload, size: int, errors: list[BaseException]) -> None:
    try:
        for i in range(0, len(wl.events), size):
            client.send(wl.events[i : i + size])
    except BaseException as exc:  # surfaced by the test thread
        errors.append(exc)


def test_kill9_of_tally_run_while_clients_retry(tmp_path: Path) -> None:
    data = tmp_path / "data"
    state: dict[str, Any] = {}
    state["proc"], state["url"] = start_embedded(data, tmp_path / "run0.log")
    try:
        key = create_tenant(state["url"], "acme")
        create_meters(state["url"], key)
        wl = Workload(seed=23, n_unique=6000).generate()
        client = RetryingClient(key, lambda: state["url"])
        errors: list[BaseException] = []
        sender = threading.Thread(target=_send_all, args=(client, wl, 100, errors))
        sender.start()
        rnd = random.Random(7)
        kills = 0
        while sender.is_alive() and kills < 3:
            time.sleep(rnd.uniform(1.5, 4.0))
            if not sender.is_alive():
                break
            state["proc"].kill9()
            kills += 1
            state["proc"], state["url"] = start_embedded(data, tmp_path / f"run{kills}.log")
        sender.join(600)
        assert not errors, errors
        assert kills >= 1, "the workload finished before any kill; make it bigger"
        assert client.failures >= 1  # some requests really were cut off and retried
        assert_matches(query_all(state["url"], key, wl), wl.truth())
    finally:
        if state["proc"].alive():
            state["proc"].terminate()


def _poll_until_equal(url: str, key: str, wl: Workload, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert_matches(query_all(url, key, wl), wl.truth())
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_kill9_of_scaleout_workers(tmp_path: Path, broker: Any, unique: str) -> None:
    from tests.support.chdb_http import start_server

    bridge, ch_url = start_server(tmp_path / "ch")
    env = tally_env(
        TALLY_KAFKA_BOOTSTRAP=broker.bootstrap,
        TALLY_CLICKHOUSE_URL=ch_url,
        TALLY_CLICKHOUSE_DATABASE=f"chaos_{unique}",
        TALLY_EVENTS_TOPIC=f"tally.events.{unique}",
        TALLY_EVENTS_PARTITIONS="6",
        TALLY_CONSUMER_GROUP=f"g-{unique}",
        TALLY_INGEST_WAIT="broker",
    )
    procs: list[TallyProcess] = []
    try:
        mig = TallyProcess(["migrate"], env, tmp_path / "migrate.log").start()
        assert mig.proc is not None and mig.proc.wait(120) == 0, mig.tail()
        port = __import__("runtime.broker", fromlist=["free_port"]).free_port()
        api = TallyProcess(["api", "--port", str(port)], env, tmp_path / "api.log").start()
        procs.append(api)
        url = f"http://127.0.0.1:{port}"
        wait_http(url)
        workers = [
            TallyProcess(
                ["worker", "--data-dir", str(tmp_path / f"w{i}")], env, tmp_path / f"worker{i}.log"
            ).start()
            for i in range(2)
        ]
        procs += workers
        key = create_tenant(url, "acme")
        create_meters(url, key)
        wl = Workload(seed=31, n_unique=8000).generate()
        client = RetryingClient(key, lambda: url, wait="broker")
        errors: list[BaseException] = []
        sender = threading.Thread(target=_send_all, args=(client, wl, 100, errors))
        sender.start()
        rnd = random.Random(3)
        kills = 0
        while kills < 4:
            time.sleep(rnd.uniform(1.0, 3.0))
            i = rnd.randrange(len(workers))
            workers[i].kill9()
            kills += 1
            workers[i] = TallyProcess(
                ["worker", "--data-dir", str(tmp_path / f"w{i}")],
                env,
                tmp_path / f"worker{i}.{kills}.log",
            ).start()
            procs.append(workers[i])
        sender.join(600)
        assert not errors, errors
        _poll_until_equal(url, key, wl)
    finally:
        for p in procs:
            if p.alive():
                p.terminate()
        bridge.kill()
        bridge.wait()
