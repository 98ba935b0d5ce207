"""kill -9 at any moment, the store unreachable, the broker frozen: after recovery the totals
equal the ground truth exactly."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
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


def _readyz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        r = httpx.get(url + "/readyz", timeout=10)
        return r.status_code, r.json()
    except (httpx.HTTPError, ValueError):
        return 0, {}


def test_scaleout_store_outage_and_broker_pause(tmp_path: Path, unique: str) -> None:
    """Scale-out roles (migrate, api, 2 workers; chDB behind the HTTP bridge; a broker of its
    own). 1) The store is unreachable for 60 s while a client keeps sending: the workers stay
    up (same processes, backing off, not crash-looping), /readyz is red naming the store and the
    worker; after the store returns everything is stored exactly once. 2) The broker is frozen
    (SIGSTOP): ingest answers 503 + Retry-After; after SIGCONT ingest recovers without a restart
    of Tally and a retrying client ends exact."""
    from runtime.broker import BrokerProcess, free_port
    from tests.support.chdb_http import Bridge

    kafka = BrokerProcess(log_file=tmp_path / "tansu.log").start()
    bridge = Bridge(tmp_path / "ch", log_file=tmp_path / "bridge.log")
    bridge.start()
    env = tally_env(
        TALLY_KAFKA_BOOTSTRAP=kafka.bootstrap,
        TALLY_CLICKHOUSE_URL=bridge.url,
        TALLY_CLICKHOUSE_DATABASE=f"outage_{unique}",
        TALLY_EVENTS_TOPIC=f"tally.events.{unique}",
        TALLY_EVENTS_PARTITIONS="4",
        TALLY_CONSUMER_GROUP=f"g-{unique}",
        TALLY_INGEST_WAIT="broker",
        TALLY_PRODUCE_TIMEOUT_S="3",
        TALLY_RETRY_AFTER_S="2",
        TALLY_WORKER_HEARTBEAT_S="1",
        TALLY_WORKER_MAX_FAILING_S="3",
    )
    procs: list[TallyProcess] = []
    try:
        mig = TallyProcess(["migrate"], env, tmp_path / "migrate.log").start()
        assert mig.proc is not None and mig.proc.wait(120) == 0, mig.tail()
        port = free_port()
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
        pids = [w.proc.pid for w in workers]  # type: ignore[union-attr]
        key = create_tenant(url, "acme")
        create_meters(url, key)
        deadline = time.monotonic() + 120
        while _readyz(url)[0] != 200:
            assert time.monotonic() < deadline, _readyz(url)
            time.sleep(0.5)
        wl = Workload(seed=41, n_unique=6000).generate()
        half = len(wl.events) // 2
        first = Workload(seed=41, n_unique=0)
        first.events = wl.events[:half]
        client = RetryingClient(key, lambda: url, wait="broker")
        errors: list[BaseException] = []
        sender = threading.Thread(target=_send_all, args=(client, first, 50, errors))
        sender.start()

        # --- 1. the store unreachable for 60 s while events flow -----------------------------
        time.sleep(2)
        bridge.kill()
        down_at = time.monotonic()
        red: dict[str, Any] = {}
        while time.monotonic() - down_at < 60:
            for w in workers:
                assert w.alive(), f"a worker exited while the store was down:\n{w.tail()}"
            code, body = _readyz(url)
            if code == 503 and not body["checks"]["worker"] == "ok":
                red = body
            time.sleep(2)
        assert red, "/readyz never turned red while the store was down"
        assert red["checks"]["store"].startswith("unreachable"), red
        assert red["checks"]["worker"] != "ok", red
        assert [w.proc.pid for w in workers] == pids  # type: ignore[union-attr]
        bridge.start()  # same directory, same port
        sender.join(600)
        assert not errors, errors
        assert all(w.alive() for w in workers)
        deadline = time.monotonic() + 120
        while _readyz(url)[0] != 200:
            assert time.monotonic() < deadline, _readyz(url)
            time.sleep(1)

        # --- 2. the broker frozen: 503 + Retry-After, then recovery without a restart ---------
        assert kafka.proc is not None
        os.killpg(kafka.proc.pid, signal.SIGSTOP)
        try:
            r = httpx.post(
                url + "/v1/events",
                json=wl.events[half : half + 10],
                params={"wait": "broker"},
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"] == "broker_unavailable"
            second = Workload(seed=41, n_unique=0)
            second.events = wl.events[half:]
            sender = threading.Thread(target=_send_all, args=(client, second, 50, errors))
            sender.start()
            time.sleep(10)
        finally:
            os.killpg(kafka.proc.pid, signal.SIGCONT)
        sender.join(600)
        assert not errors, errors
        assert api.alive() and all(w.alive() for w in workers)
        assert [w.proc.pid for w in workers] == pids  # type: ignore[union-attr]
        _poll_until_equal(url, key, wl, timeout=180)
    finally:
        for p in procs:
            if p.alive():
                p.terminate()
        bridge.kill()
        kafka.stop()
