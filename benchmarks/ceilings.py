"""Ceilings measured in the same run: what the parts can do on their own, on this machine.

- broker: raw produce (confluent-kafka, the ingest API's producer settings) and raw consume
  (aiokafka, the client Faust uses) of real envelopes (~batch/partitions events each) on a
  fresh embedded Tansu, or on ``kafka_bootstrap``; plus the produce-ack latency of one request's
  envelopes (the floor of a ``wait=broker`` answer);
- store: clickhouse-connect ``insert_arrow`` of rows in the ``events`` table format into a fresh
  migrated chDB database (child process), or into ``clickhouse_url``; plus the latency of one
  1000-row insert;
- JSON: ``orjson.loads`` of the same envelopes (what the worker decodes: a version 2 envelope's
  header line and its property lines as one array, the two documents the worker parses) and of
  request bodies (what the API decodes), with the garbage collector on as in a real process.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from typing import Any

import orjson

from benchmarks.jobs import Progress
from benchmarks.workload import EventFactory
from runtime.roles import EMBEDDED_PARTITIONS

ENVELOPE_PARTITIONS = EMBEDDED_PARTITIONS  # what `tally run` uses on a new data directory


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def sample_requests(n_requests: int, batch: int, seed: int = 7) -> list[list[dict[str, Any]]]:
    f = EventFactory(seed, "ceil-", 1000, 1.1, 0.0, 0.01)
    now = int(time.time() * 1000)
    return [f.batch(0, batch, now)[0] for _ in range(n_requests)]


def envelopes(
    requests: list[list[dict[str, Any]]], partitions: int
) -> list[tuple[int, bytes, int]]:
    """The envelopes the ingest API would produce for these requests: (partition, payload, n)."""
    from schemas.envelope import group_rows
    from schemas.timeutil import epoch_ms, parse_time

    out = []
    now = int(time.time() * 1000)
    for req in requests:
        rows = [
            (e["id"], e["type"], e["customer"], epoch_ms(parse_time(e["time"])), e["properties"])
            for e in req
        ]
        for env in group_rows("tenant-ceiling", now, rows, partitions, 1000):
            out.append((env.partition, env.payload, len(env.event_ids)))
    return out


def _json_documents(payload: bytes) -> list[bytes]:
    """The JSON documents of an envelope: a version 2 envelope's header line and its property
    lines as one array (``schemas.envelope``); a version 1 envelope is one."""
    head, newline, lines = payload.partition(b"\n")
    return [head, b"[%b]" % lines.replace(b"\n", b",")] if newline else [payload]


def json_ceiling(seconds: float, batch: int) -> dict[str, float]:
    requests = sample_requests(20, batch)
    bodies = [orjson.dumps(r) for r in requests]
    envs = envelopes(requests, ENVELOPE_PARTITIONS)

    def rate(payloads: list[list[bytes]], per: list[int]) -> float:
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            for docs, k in zip(payloads, per, strict=True):
                for doc in docs:
                    orjson.loads(doc)
                n += k
        return n / (time.perf_counter() - t0)

    return {
        "envelope_events_per_s": rate([_json_documents(e[1]) for e in envs], [e[2] for e in envs]),
        "request_body_events_per_s": rate([[b] for b in bodies], [len(r) for r in requests]),
        "envelope_bytes_mean": statistics.fmean(len(e[1]) for e in envs),
        "events_per_envelope_mean": statistics.fmean(e[2] for e in envs),
    }


def broker_ceiling(
    n_msgs: int, batch: int, bootstrap: str | None, progress: Progress | None = None
) -> dict[str, float]:
    """Produce ``n_msgs`` real envelopes as fast as possible, then consume them all."""
    from confluent_kafka import Producer

    from api.topics import create_topic
    from runtime.broker import BrokerProcess

    envs = envelopes(sample_requests(8, batch), ENVELOPE_PARTITIONS)
    broker = None
    if bootstrap is None:
        broker = BrokerProcess(log_file=None).start()
        bootstrap = broker.bootstrap
    topic = f"bench.ceiling.{uuid.uuid4().hex[:8]}"
    try:
        create_topic(bootstrap, topic, ENVELOPE_PARTITIONS)
        conf = {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 2,
            "compression.type": "none",
        }
        p = Producer(conf)
        events = 0
        nbytes = 0
        t0 = time.perf_counter()
        for i in range(n_msgs):
            part, payload, n = envs[i % len(envs)]
            while True:
                try:
                    p.produce(topic, payload, key=b"tenant-ceiling", partition=part)
                    break
                except BufferError:
                    p.poll(0.005)
            events += n
            nbytes += len(payload)
            if progress is not None and i % 500 == 0:
                progress(i, n_msgs, "broker produce")
        p.flush(300)
        produce_s = time.perf_counter() - t0

        # Ack latency of one request's envelopes, produced and flushed one request at a time.
        lat = []
        per_request = envs[:ENVELOPE_PARTITIONS]
        for _ in range(50):
            t = time.perf_counter()
            for part, payload, _n in per_request:
                p.produce(topic, payload, key=b"tenant-ceiling", partition=part)
            p.flush(30)
            lat.append(time.perf_counter() - t)

        expected = n_msgs + 50 * len(per_request)
        consume_s, consumed = asyncio.run(_consume(bootstrap, topic, expected, progress))
    finally:
        if broker is not None:
            broker.stop()
    return {
        "produce_msgs_per_s": n_msgs / produce_s,
        "produce_events_per_s": events / produce_s,
        "produce_mb_per_s": nbytes / produce_s / 1e6,
        "consume_msgs_per_s": consumed / consume_s,
        "consume_events_per_s": consumed / consume_s * (events / n_msgs),
        "consumed_msgs": consumed,
        "produce_ack_p50_s": _pct(lat, 0.5),
        "produce_ack_p99_s": _pct(lat, 0.99),
    }


async def _consume(
    bootstrap: str, topic: str, expected: int, progress: Progress | None
) -> tuple[float, int]:
    from aiokafka import AIOKafkaConsumer

    c = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await c.start()
    try:
        got = 0
        t0 = time.perf_counter()
        deadline = t0 + 300
        while got < expected and time.perf_counter() < deadline:
            batches = await c.getmany(timeout_ms=500, max_records=5000)
            for msgs in batches.values():
                got += len(msgs)
            if progress is not None:
                progress(got, expected, "broker consume")
        return time.perf_counter() - t0, got
    finally:
        await c.stop()


def store_ceiling_job(rows: int, url: str | None, *, progress: Progress) -> dict[str, float]:
    """(child process) insert_arrow of ``rows`` events-format rows into a fresh database."""
    import pyarrow as pa

    from clickhouse.sink import EVENTS_COLUMNS
    from clickhouse.store import Store

    tmp = None
    if url is None:
        tmp = tempfile.mkdtemp(prefix="tally-bench-ceiling-")
        url = f"chdb://{tmp}"
    db = f"bench_ceiling_{uuid.uuid4().hex[:8]}"
    store = Store.open(url, db)
    try:
        store.migrate()
        now = int(time.time() * 1000)
        chunk = 50_000

        def table(n: int, start: int) -> pa.Table:
            ids = [f"ceil-{start + i:012d}" for i in range(n)]
            props = orjson.dumps(
                {
                    "endpoint": "/v1/chat/completions",
                    "region": "eu-west-1",
                    "tokens": 123,
                    "user": "user-00042",
                }
            ).decode()
            ts = pa.array([now - (i % 5000) for i in range(n)], pa.timestamp("ms", tz="UTC"))
            cols = {
                "tenant_id": pa.array([f"t{i % 4}" for i in range(n)]),
                "event_id": pa.array(ids),
                "event_type": pa.array(["api.request"] * n),
                "customer": pa.array([f"cust-{i % 1000:06d}" for i in range(n)]),
                "time": ts,
                "properties": pa.array([props] * n),
                "ingested_at": ts,
                "source_topic": pa.array(["bench.ceiling"] * n),
                "source_partition": pa.array([i % 8 for i in range(n)], pa.int32()),
                "source_offset": pa.array([(start + i) // 125 for i in range(n)], pa.int64()),
                "source_index": pa.array([(start + i) % 125 for i in range(n)], pa.uint32()),
            }
            return pa.table([cols[c] for c in EVENTS_COLUMNS], names=EVENTS_COLUMNS)

        tables = [table(min(chunk, rows - s), s) for s in range(0, rows, chunk)]
        target = f"{db}.events"
        t0 = time.perf_counter()
        for i, t in enumerate(tables):
            store.client.insert_arrow(target, t)
            progress(i + 1, len(tables) + 1, "store insert_arrow")
        insert_s = time.perf_counter() - t0
        small = table(1000, rows)
        lat = []
        for _ in range(20):
            t = time.perf_counter()
            store.client.insert_arrow(target, small)
            lat.append(time.perf_counter() - t)
        progress(len(tables) + 1, len(tables) + 1, "store insert_arrow")
        return {
            "insert_arrow_rows_per_s": rows / insert_s,
            "insert_1000_rows_p50_s": _pct(lat, 0.5),
        }
    finally:
        store.command(f"DROP DATABASE IF EXISTS {db}")
        store.close()
