"""Quick end-to-end benchmark of the embedded mode (`tally run`).

Measures, in one run on this machine:
- ceilings: raw Tansu produce rate (confluent-kafka, 1 KB-ish envelopes) and raw chDB insert rate;
- sustained ingest: events/s accepted over HTTP (wait=broker) and events/s stored (queryable);
- freshness: time from an ingest answer (wait=broker) to the event being visible in a usage
  query, p50/p99, under background load.
Writes benchmarks/results/ingest_e2e.json. Not a test: numbers depend on the machine.

    .venv/bin/python benchmarks/ingest_e2e.py [--seconds 20] [--clients 4] [--batch 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.e2e.harness import create_tenant, start_embedded  # noqa: E402


def broker_ceiling(n_msgs: int = 50_000) -> float:
    from confluent_kafka import Producer

    from api.topics import create_topic
    from runtime.broker import BrokerProcess

    with BrokerProcess() as b:
        create_topic(b.bootstrap, "bench", 4)
        p = Producer(
            {
                "bootstrap.servers": b.bootstrap,
                "acks": "all",
                "linger.ms": 5,
                "enable.idempotence": True,
            }
        )
        payload = b"x" * 1000
        t = time.perf_counter()
        for i in range(n_msgs):
            while True:
                try:
                    p.produce("bench", payload, partition=i % 4)
                    break
                except BufferError:
                    p.poll(0.01)
        p.flush(60)
        return n_msgs / (time.perf_counter() - t)


def chdb_ceiling(rows: int = 200_000) -> float:
    import subprocess

    code = (
        "import clickhouse_connect,tempfile,time,datetime\n"
        "c=clickhouse_connect.get_client(dsn='chdb://'+tempfile.mkdtemp())\n"
        "c.command('CREATE TABLE t (a String, b String, t DateTime64(3), v Int64) "
        "ENGINE=MergeTree ORDER BY (a,b)')\n"
        f"n={rows}\n"
        "now=datetime.datetime(2026,1,1)\n"
        "cols=[[f't{i%10}' for i in range(n)],[f'id{i}' for i in range(n)],[now]*n,list(range(n))]\n"
        "s=time.perf_counter(); c.insert('t',cols,column_names=['a','b','t','v'],column_oriented=True)\n"
        "print(n/(time.perf_counter()-s))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--probes", type=int, default=30)
    args = ap.parse_args()

    result: dict[str, object] = {"when": datetime.now(UTC).isoformat(), "args": vars(args)}
    result["ceiling_broker_msgs_per_s"] = round(broker_ceiling())
    result["ceiling_chdb_rows_per_s"] = round(chdb_ceiling())
    print(json.dumps(result), flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    # measure the system, not the default per-tenant limits (docs/operations.md)
    proc, url = start_embedded(
        tmp / "data",
        tmp / "tally.log",
        TALLY_TENANT_EVENTS_PER_S="0",
        TALLY_TENANT_REQUESTS_PER_S="0",
    )
    try:
        key = create_tenant(url, "bench")
        hdr = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
        httpx.post(
            url + "/v1/meters",
            headers=hdr,
            json={"slug": "calls", "event_type": "api.call", "aggregation": "count"},
        ).raise_for_status()
        httpx.post(
            url + "/v1/meters",
            headers=hdr,
            json={
                "slug": "bytes",
                "event_type": "api.call",
                "aggregation": "sum",
                "value_property": "$.bytes",
            },
        ).raise_for_status()
        time.sleep(1)

        sent: dict[int, int] = dict.fromkeys(range(args.clients), 0)
        stop = threading.Event()
        now_ms = int(time.time() * 1000)

        def load(ci: int, rate: float = 0.0) -> None:
            """Send batches until ``stop``; ``rate`` > 0 caps this client at rate events/s."""
            with httpx.Client(timeout=60) as c:
                n = 0
                t_start = time.perf_counter()
                while not stop.is_set():
                    if rate:
                        ahead = n / rate - (time.perf_counter() - t_start)
                        if ahead > 0:
                            time.sleep(ahead)
                    body = orjson.dumps(
                        [
                            {
                                "id": f"{ci}-{n + j}",
                                "type": "api.call",
                                "customer": f"c{(n + j) % 500}",
                                "time": now_ms,
                                "properties": {"bytes": j},
                            }
                            for j in range(args.batch)
                        ]
                    )
                    r = c.post(url + "/v1/events?wait=broker", content=body, headers=hdr)
                    if r.status_code < 300:
                        sent[ci] = sent.get(ci, 0) + args.batch
                    n += args.batch

        threads = [threading.Thread(target=load, args=(i,)) for i in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        accepted = sum(sent.values())
        frm = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:00Z")
        to = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:00Z")

        def total() -> int:
            r = httpx.get(
                url + "/v1/meters/calls/usage",
                headers=hdr,
                params={"from": frm, "to": to},
                timeout=30,
            )
            r.raise_for_status()
            return int(sum(int(float(row["value"] or 0)) for row in r.json()["data"]))

        deadline = time.monotonic() + 300
        while total() < accepted and time.monotonic() < deadline:
            time.sleep(0.2)
        stored_elapsed = time.perf_counter() - t0
        result["ingest_accepted_events_per_s"] = round(accepted / elapsed)
        result["ingest_stored_events_per_s"] = round(total() / stored_elapsed)
        result["events_accepted"] = accepted

        def probe(n: int) -> list[float]:
            lat = []
            with httpx.Client(timeout=30) as c:
                for _ in range(n):
                    cust = "probe-" + uuid.uuid4().hex[:8]
                    c.post(
                        url + "/v1/events?wait=broker",
                        headers=hdr,
                        json=[
                            {
                                "id": uuid.uuid4().hex,
                                "type": "api.call",
                                "customer": cust,
                                "properties": {"bytes": 1},
                            }
                        ],
                    ).raise_for_status()
                    t_ack = time.perf_counter()
                    while True:
                        r = c.get(
                            url + "/v1/meters/calls/usage",
                            headers=hdr,
                            params={"from": frm, "to": to, "customer": cust},
                        )
                        if r.status_code == 200 and any(
                            row["value"] not in (None, "0") for row in r.json()["data"]
                        ):
                            break
                        time.sleep(0.01)
                    lat.append(time.perf_counter() - t_ack)
            return sorted(lat)

        idle = probe(max(5, args.probes // 3))
        result["freshness_idle_p50_s"] = round(statistics.median(idle), 3)
        # Freshness at half of the measured maximum (stored) rate.
        half_rate = result["ingest_stored_events_per_s"] / 2  # type: ignore[operator]
        result["half_load_events_per_s"] = round(half_rate)
        stop.clear()
        half = [threading.Thread(target=load, args=(9, half_rate))]
        for t in half:
            t.start()
        time.sleep(3)
        before = sent.get(9, 0)
        t_half = time.perf_counter()
        lat = probe(args.probes)
        result["half_load_measured_events_per_s"] = round(
            (sent.get(9, 0) - before) / (time.perf_counter() - t_half)
        )
        stop.set()
        for t in half:
            t.join()
        result["freshness_p50_s"] = round(statistics.median(lat), 3)
        result["freshness_p99_s"] = round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3)
        result["freshness_max_s"] = round(lat[-1], 3)
    finally:
        proc.terminate()
    out = ROOT / "benchmarks" / "results" / "ingest_e2e.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
