"""`tally worker` serves its own /metrics, /healthz and /readyz (real Tansu, chDB behind the
HTTP bridge, the real CLI in a child process): the worker's counters, lag and process metrics;
readiness naming the store when it goes away; a taken port stops the worker with a clear error."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Producer

from runtime.broker import free_port
from schemas.envelope import group_rows
from tests.integration.e2e.harness import TallyProcess, tally_env, wait_http
from tests.support.chdb_http import Bridge


def _metric(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def _until(url: str, pred: Any, timeout: float = 90) -> tuple[int, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    last: tuple[int, Any] = (0, None)
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/readyz", timeout=10)
            last = (r.status_code, r.json())
            if pred(*last):
                return last
        except httpx.HTTPError as exc:
            last = (0, repr(exc))
        time.sleep(0.5)
    raise AssertionError(f"/readyz never matched: {last}")


def test_worker_serves_metrics_health_and_readiness(
    tmp_path: Path, broker: Any, unique: str
) -> None:
    bridge = Bridge(tmp_path / "ch", log_file=tmp_path / "bridge.log")
    bridge.start()
    port = free_port()
    topic = f"tally.events.{unique}"
    env = tally_env(
        TALLY_KAFKA_BOOTSTRAP=broker.bootstrap,
        TALLY_CLICKHOUSE_URL=bridge.url,
        TALLY_CLICKHOUSE_DATABASE=f"wm_{unique}",
        TALLY_EVENTS_TOPIC=topic,
        TALLY_EVENTS_PARTITIONS="4",
        TALLY_CONSUMER_GROUP=f"g-{unique}",
        TALLY_WORKER_METRICS_PORT=str(port),
        TALLY_WORKER_HEARTBEAT_S="1",
    )
    procs: list[TallyProcess] = []
    try:
        mig = TallyProcess(["migrate"], env, tmp_path / "migrate.log").start()
        assert mig.proc is not None and mig.proc.wait(120) == 0, mig.tail()
        worker = TallyProcess(
            ["worker", "--data-dir", str(tmp_path / "w")], env, tmp_path / "worker.log"
        ).start()
        procs.append(worker)
        url = f"http://127.0.0.1:{port}"
        wait_http(url, timeout=120)
        _code, body = _until(url, lambda c, b: c == 200)
        assert body["checks"] == {
            "store": "ok",
            "migrations": "ok",
            "broker": "ok",
            "worker": "ok",
            "lag": "ok",
            "freshness": "ok",
        }, body
        assert body["components"]["worker"]["workers"][0]["partitions"] == [0, 1, 2, 3]

        # events go through; the worker's own /metrics counts them
        p = Producer({"bootstrap.servers": broker.bootstrap})
        rows = [(f"e{i % 90}", "api", "c", 1_700_000_000_000, {}) for i in range(100)]
        for env_ in group_rows("acme", 1_700_000_000_000, rows, 4, 10):
            p.produce(topic, env_.payload, b"acme", partition=env_.partition)
        assert p.flush(10) == 0
        deadline = time.monotonic() + 90
        while True:
            r = httpx.get(url + "/metrics", headers={"X-Request-ID": "scrape-1"}, timeout=10)
            text = r.text
            stored = _metric(text, "tally_worker_events_total", '{outcome="stored"}')
            lag_measured = _metric(text, "tally_worker_consumer_lag", '{partition="0"}')
            if stored == 90 and lag_measured == 0:
                break
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(0.5)
        assert r.headers["x-request-id"] == "scrape-1"
        assert _metric(text, "tally_worker_events_total", '{outcome="consumed"}') == 100
        assert _metric(text, "tally_worker_events_total", '{outcome="duplicate"}') == 10
        assert _metric(text, "tally_worker_up") == 1
        assert _metric(text, "tally_worker_store_up") == 1
        assert _metric(text, "tally_worker_broker_up") == 1
        assert _metric(text, "tally_worker_partitions") == 4
        assert (_metric(text, "tally_worker_dedupe_index_entries") or 0) >= 90
        assert (_metric(text, "process_resident_memory_bytes") or 0) > 10_000_000
        assert _metric(text, "process_cpu_seconds_total") is not None
        assert "tally_worker_flush_seconds_bucket" in text
        assert httpx.get(url + "/healthz", timeout=10).json() == {"status": "ok"}

        # a second worker on the same port: a clear error, exit 1 (not a silent worker)
        clash = TallyProcess(
            ["worker", "--data-dir", str(tmp_path / "w2")], env, tmp_path / "clash.log"
        ).start()
        procs.append(clash)
        assert clash.proc is not None and clash.proc.wait(120) == 1, clash.tail()
        assert "cannot serve /metrics" in clash.tail() and str(port) in clash.tail()

        # the store goes away: the worker's /readyz names it; it comes back: green again
        bridge.kill()
        _code, body = _until(url, lambda c, b: c == 503 and b["checks"]["store"] != "ok")
        assert body["checks"]["store"].startswith("unreachable"), body
        assert body["checks"]["migrations"] == "unknown: the store is unreachable"
        assert body["checks"]["broker"] == "ok"
        bridge.start()
        _until(url, lambda c, b: c == 200)
        assert worker.alive()
        assert worker.terminate() == 0, worker.tail()
    finally:
        for proc in procs:
            if proc.alive():
                proc.terminate()
        bridge.kill()
