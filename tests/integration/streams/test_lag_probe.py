"""The lag probe against real Tansu: the log end from a fetch's high watermark is exact where
ListOffsets(LATEST) is not (Tansu answers the last batch's base offset + 1), and the first
unstored message's timestamp gives the freshness."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from streams.lag import LogProbe


def _produce_batches(bootstrap: str, topic: str, partition: int, sizes: list[int]) -> None:
    """Each size is one record batch (linger holds the records, flush sends them together)."""
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 200,
            "acks": "all",
            "enable.idempotence": True,
        }
    )
    for n, size in enumerate(sizes):
        for i in range(size):
            p.produce(topic, b"m-%d-%d" % (n, i), partition=partition)
        assert p.flush(10) == 0


def _list_offsets_end(bootstrap: str, topic: str, partition: int) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "lo", "enable.auto.commit": False})
    try:
        return int(c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1])
    finally:
        c.close()


def test_log_end_is_exact_where_list_offsets_is_not(broker: Any, topic: str) -> None:
    _produce_batches(broker.bootstrap, topic, 0, [5, 3])  # offsets 0..7, two batches
    _produce_batches(broker.bootstrap, topic, 1, [1])
    # the bug the probe avoids (if Tansu ever fixes it, this line tells us)
    assert _list_offsets_end(broker.bootstrap, topic, 0) == 6
    probe = LogProbe(broker.bootstrap, topic, group="probe-test")
    try:
        r = probe.measure({0: -1, 1: -1, 2: -1, 3: -1})
        assert {p.partition: p.end for p in r.partitions} == {0: 8, 1: 1, 2: 0, 3: 0}
        assert r.by_partition == {0: 8, 1: 1, 2: 0, 3: 0} and r.total_lag == 9
        # stored up to 4 (the end of the first batch) and up to 6 (inside the second)
        r = probe.measure({0: 4, 1: 0})
        assert r.by_partition == {0: 3, 1: 0}
        r = probe.measure({0: 6})
        assert r.by_partition == {0: 1}
        r = probe.measure({0: 7, 1: 0, 2: -1, 3: -1})
        assert r.total_lag == 0 and r.freshness_s() == 0
    finally:
        probe.close()


def test_freshness_is_the_age_of_the_first_unstored_message(broker: Any, topic: str) -> None:
    before = time.time_ns() // 1_000_000
    _produce_batches(broker.bootstrap, topic, 2, [2])
    time.sleep(1.2)
    _produce_batches(broker.bootstrap, topic, 2, [2])
    after_second = time.time_ns() // 1_000_000
    probe = LogProbe(broker.bootstrap, topic)
    try:
        r = probe.measure({2: -1})
        (p,) = r.partitions
        assert p.lag == 4 and p.first_unstored_ms is not None
        assert before - 50 <= p.first_unstored_ms <= before + 1_000
        assert r.freshness_s() >= 1.0
        r = probe.measure({2: 1})  # the first batch stored: the second one's age counts
        (p,) = r.partitions
        assert p.lag == 2 and p.first_unstored_ms is not None
        assert before + 1_000 <= p.first_unstored_ms <= after_second + 50
        assert r.freshness_s() < 1.5
    finally:
        probe.close()


def test_lag_grows_while_nothing_is_stored_and_the_probe_is_reusable(
    broker: Any, topic: str
) -> None:
    probe = LogProbe(broker.bootstrap, topic)
    try:
        seen = []
        for round_ in range(4):
            _produce_batches(broker.bootstrap, topic, 3, [round_ + 1])
            seen.append(probe.measure({3: -1}).total_lag)
        assert seen == [1, 3, 6, 10]
        assert probe.ping()
    finally:
        probe.close()


def test_an_unreachable_broker_fails_the_measurement(topic: str) -> None:
    from runtime.broker import free_port

    probe = LogProbe(f"127.0.0.1:{free_port()}", topic)
    try:
        t0 = time.monotonic()
        try:
            probe.measure({0: -1}, timeout=2.0)
        except (TimeoutError, RuntimeError) as exc:
            assert "did not answer" in str(exc) or "failed" in str(exc)
        else:
            raise AssertionError("a measurement without a broker must fail, not say lag 0")
        assert time.monotonic() - t0 < 30
        assert not probe.ping(timeout=1.0)
    finally:
        probe.close()
