"""Worker throughput (events/s) on envelopes of 100 and 1000 events: real Tansu + chDB.

Run: python -m tests.integration.streams.throughput [events] — not a test, nothing asserted.
The topic is filled first; the clock runs from partition assignment until the store's progress
reaches the end of every partition; events per CPU-second = events / CPU seconds this process
(worker threads and chDB, not the broker) used meanwhile, a figure other users of a shared
machine barely move (5 meters per event: count, sum+group_by, max+filter,
unique_count, latest).
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer

from api.topics import create_topic
from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store
from runtime.broker import BrokerProcess
from schemas.envelope import group
from schemas.events import Event
from schemas.timeutil import epoch_ms, from_epoch_ms, utc_now
from streams.worker import WorkerRunner
from tests.integration.streams.helpers import PARTITIONS, create_meters, worker_settings


def run(
    broker: BrokerProcess, store: Store, tmp: Path, total: int, envelope: int
) -> tuple[float, float]:
    tenant, _ = create_meters(store)
    topic = f"bench.{uuid.uuid4().hex[:8]}"
    create_topic(broker.bootstrap, topic, PARTITIONS)
    now = epoch_ms(utc_now())
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20})
    last: dict[int, int] = {}

    def on_delivery(err: object, msg: object) -> None:
        last[msg.partition()] = max(last.get(msg.partition(), -1), msg.offset())  # type: ignore[attr-defined]

    chunk = 20_000
    for start in range(0, total, chunk):
        evs = [
            Event(
                id=f"e{i}",
                type="api",
                customer=f"c{i % 50}",
                time=from_epoch_ms(now - (i % 600_000)),
                properties={
                    "bytes": i % 997,
                    "region": ("eu", "us", "ap")[i % 3],
                    "user": f"u{i % 300}",
                },
            )
            for i in range(start, min(total, start + chunk))
        ]
        for env in group(tenant, now, evs, PARTITIONS, envelope):
            producer.produce(topic, env.payload, partition=env.partition, on_delivery=on_delivery)
            producer.poll(0)
    producer.flush(60)
    settings = worker_settings(broker.bootstrap, topic, f"bench-{uuid.uuid4().hex[:6]}", tmp)
    settings = settings.model_copy(update={"flush_max_events": 50_000, "flush_interval_s": 0.5})
    sink = ClickHouseSink(store)
    runner = WorkerRunner(settings, sink, dedupe_dir=tmp / f"dedupe-{topic}")
    cpu0 = time.process_time()
    assert runner.start(timeout=90)
    t0 = time.perf_counter()
    while True:
        prog = sink.progress(topic)
        if all(prog.get(p, -1) >= o for p, o in last.items()):
            break
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0  # this process: worker threads + chDB (not the broker)
    runner.stop()
    return total / elapsed, total / cpu


def main() -> None:
    total = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with tempfile.TemporaryDirectory() as d, BrokerProcess() as broker:
        tmp = Path(d)
        store = Store.open(f"chdb://{tmp / 'chdb'}", "bench")
        store.migrate()
        for envelope in (100, 1000):
            rate, per_cpu = run(broker, store, tmp, total, envelope)
            print(
                f"envelope={envelope:5d} events={total} worker throughput={rate:,.0f} events/s "
                f"per CPU-second={per_cpu:,.0f} events"
            )
        store.close()


if __name__ == "__main__":
    main()
