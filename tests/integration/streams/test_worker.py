"""The worker end to end: real Tansu broker, real chDB, real ClickHouseSink. Exactly-once counts
under duplicates, late events, restarts, crashes between flushes and store failures."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from clickhouse.deadletters import DeadLetterRepo
from clickhouse.repo import Repo
from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store
from schemas.events import Event
from schemas.meters import MeterSpec
from schemas.timeutil import utc_now
from streams.progress import ProgressBoard
from streams.worker import WorkerRunner
from tests.integration.streams.helpers import (
    EventSource,
    Truth,
    Worker,
    create_meters,
    produce,
    stored_totals,
    wait_stored,
    worker_settings,
)
from tests.support.faulty_store import FaultyStore


@pytest.fixture
def setup(broker: Any, topic: str, store: Store, unique: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    tenant, meters = create_meters(store)
    truth = Truth(tenant)
    settings = worker_settings(broker.bootstrap, topic, f"grp-{unique}", tmp_path)
    return settings, ClickHouseSink(store), truth, meters, EventSource(truth)


def check(store: Store, truth: Truth, meters: dict[str, Any]) -> None:
    assert stored_totals(store, truth.tenant, meters) == truth.totals()


def test_exact_with_duplicates_and_late_events(setup, broker, topic, store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings, sink, truth, meters, src = setup
    produce(broker.bootstrap, topic, truth, src.batch(3_000))
    board = ProgressBoard()
    runner = WorkerRunner(settings, sink, board, dedupe_dir=tmp_path / "dedupe")
    assert runner.start(timeout=90)
    try:
        produce(broker.bootstrap, topic, truth, src.batch(3_000, dup_rate=0.3))
        wait_stored(sink, topic, truth.last_offsets)
        # notified after each commit (just after the store has it: wait, do not race it)
        assert asyncio.run(board.wait_for(topic, truth.last_offsets, 30.0))
        assert board.progress(topic) == truth.last_offsets
    finally:
        runner.stop(timeout=30)
    assert runner.error is None
    assert truth.produced > len(truth.first)  # there were duplicates
    check(store, truth, meters)


def test_values_past_the_meter_limit_do_not_stall_the_worker(  # type: ignore[no-untyped-def]
    setup, broker, topic, store, tmp_path
) -> None:
    """Two events of 6e28 in one minute window: each is inside Decimal(38, 9), their sum is not.
    Before the value limit the worker stored a window sum of 1.2e29 here (past the column's 38
    digits; the columnar aggregation raises on such windows in other paths, failing the flush).
    Now such a value is a meter_value dead letter of the sum meter, the events are counted by
    the count meter, and the other tenant's events are stored exactly."""
    settings, sink, truth, meters, src = setup
    repo = Repo(store)
    other = repo.create_tenant("mallory")[0].tenant_id
    spec = {"event_type": "api", "aggregation": "sum", "value_property": "$.v"}
    vsum = repo.create_meter(other, MeterSpec(slug="v", **spec))  # type: ignore[arg-type]
    calls = repo.create_meter(other, MeterSpec(slug="n", event_type="api", aggregation="count"))  # type: ignore[arg-type]
    time.sleep(0.01)
    now = utc_now()
    values: list[object] = ["6e28", 6e28, 1e19, 5, "9999999999999999999.5"]  # JSON: 6e28 is a float
    evs = [
        Event(id=f"v{i}", type="api", customer="c", time=now, properties={"v": v})
        for i, v in enumerate(values)
    ]
    runner = WorkerRunner(settings, sink, ProgressBoard(), dedupe_dir=tmp_path / "dedupe")
    assert runner.start(timeout=90)
    try:
        mallory = Truth(other)
        produce(broker.bootstrap, topic, mallory, evs)
        produce(broker.bootstrap, topic, truth, src.batch(2_000))
        wait_stored(sink, topic, {**mallory.last_offsets, **truth.last_offsets})
    finally:
        runner.stop(timeout=30)
    assert runner.error is None
    check(store, truth, meters)

    def total(meter_id: str, col: str) -> Any:
        return store.query_rows(
            f"SELECT sum({col}) FROM {store.database}.usage_minute "
            "WHERE tenant_id = {t:String} AND meter_id = {m:String}",
            {"t": other, "m": meter_id},
        )[0][0]

    assert total(calls.id, "events") == 5
    assert total(vsum.id, "value_sum") == Decimal("9999999999999999999.5") + 5
    dead = DeadLetterRepo(store).list(other, reason="meter_value")
    assert sorted(d.event_id for d in dead) == ["v0", "v1", "v2"]
    assert {d.meter_id for d in dead} == {vsum.id}
    assert all("below 1e19 in magnitude" in d.message for d in dead)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice values per thread")
def test_the_flush_thread_runs_at_its_configured_priority(  # type: ignore[no-untyped-def]
    setup, broker, topic, store, tmp_path
) -> None:
    """``flush_thread_nice`` is the nice value of the thread that prepares and commits and of
    the one its ledger inserts run on (a value above this thread's own: lowering a priority
    needs no privilege), not of the others."""
    settings, sink, truth, meters, src = setup
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    nice = min(own + 4, 19)
    settings = settings.model_copy(update={"flush_thread_nice": nice})
    produce(broker.bootstrap, topic, truth, src.batch(1_000))
    with Worker(settings, sink, tmp_path / "dedupe"):
        wait_stored(sink, topic, truth.last_offsets)
        for prefix in ("tally-flush", "tally-ledger"):  # the ledger insert: the flush's own
            threads = [t for t in threading.enumerate() if t.name.startswith(prefix)]
            assert len(threads) == 1 and threads[0].native_id is not None, prefix
            assert os.getpriority(os.PRIO_PROCESS, threads[0].native_id) == nice, prefix
        others = [t for t in threading.enumerate() if t.name.startswith("tally-heartbeat")]
        assert others and others[0].native_id is not None
        assert os.getpriority(os.PRIO_PROCESS, others[0].native_id) == own
    check(store, truth, meters)


def test_restart_mid_stream_same_group(setup, broker, topic, store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings, sink, truth, meters, src = setup
    for _ in range(4):
        produce(broker.bootstrap, topic, truth, src.batch(2_000))
    w1 = Worker(settings, sink, tmp_path / "dedupe").start()
    # stop as soon as something was stored, while the rest is still unconsumed or buffered
    wait_stored(sink, topic, {p: 0 for p in truth.last_offsets})
    w1.stop()
    produce(broker.bootstrap, topic, truth, src.batch(2_000, dup_rate=0.4))
    with Worker(settings, sink, tmp_path / "dedupe"):
        wait_stored(sink, topic, truth.last_offsets)
    check(store, truth, meters)


def test_restart_with_lost_dedupe_index_rebuilds_from_store(
    setup, broker, topic, store, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    settings, sink, truth, meters, src = setup
    produce(broker.bootstrap, topic, truth, src.batch(2_000))
    with Worker(settings, sink, tmp_path / "dedupe-a"):
        wait_stored(sink, topic, truth.last_offsets)
    # retries of stored ids arrive after a restart on a machine without the local index
    produce(broker.bootstrap, topic, truth, src.batch(2_000, dup_rate=0.5))
    with Worker(settings, sink, tmp_path / "dedupe-b"):
        wait_stored(sink, topic, truth.last_offsets)
    check(store, truth, meters)


def test_stop_without_final_flush_loses_and_doubles_nothing(
    setup, broker, topic, store, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    settings, sink, truth, meters, src = setup
    settings = settings.model_copy(update={"flush_interval_s": 1.0, "flush_max_events": 50_000})
    w1 = Worker(settings, sink, tmp_path / "dedupe").start()
    produce(broker.bootstrap, topic, truth, src.batch(1_500))
    wait_stored(sink, topic, truth.last_offsets)
    produce(broker.bootstrap, topic, truth, src.batch(1_500, dup_rate=0.4))
    worker = w1.runner.worker
    assert worker is not None
    deadline = time.monotonic() + 10
    while worker.processor.buffered_messages == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    # crash-like stop: what is buffered is neither stored nor acked
    w1.stop(flush=False)
    assert w1.runner.worker is not None
    assert w1.runner.worker.dropped_on_stop > 0  # the restart below really has to replay
    with Worker(settings, sink, tmp_path / "dedupe"):
        wait_stored(sink, topic, truth.last_offsets)
    check(store, truth, meters)


def test_store_failures_are_retried_exactly_once(setup, broker, topic, store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A mix of store failures before and after the inserts of later flushes (the per-step
    faults are in test_commit_faults.py)."""
    settings, sink, truth, meters, src = setup
    faulty = FaultyStore(store)
    faulty.arm("insert", table="usage_minute", skip=1)
    faulty.arm("insert", mode="after", table="usage_minute", skip=2)
    faulty.arm("insert", table="events", skip=3)
    faulty.arm("insert", mode="after", table="usage_minute", skip=5, times=2)
    produce(broker.bootstrap, topic, truth, src.batch(1_000))
    with Worker(settings, ClickHouseSink(faulty), tmp_path / "dedupe"):
        for _ in range(4):
            produce(broker.bootstrap, topic, truth, src.batch(500, dup_rate=0.4))
        wait_stored(sink, topic, truth.last_offsets)
    assert sum(f.hits for f in faulty.faults) >= 4
    check(store, truth, meters)


def test_rebalance_between_two_workers(setup, broker, topic, store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings, sink, truth, meters, src = setup
    produce(broker.bootstrap, topic, truth, src.batch(2_000))
    w1 = Worker(settings, sink, tmp_path / "dedupe-1").start()
    produce(broker.bootstrap, topic, truth, src.batch(2_000, dup_rate=0.3))
    w2 = Worker(settings, sink, tmp_path / "dedupe-2").start()  # joins: partitions move
    try:
        produce(broker.bootstrap, topic, truth, src.batch(2_000, dup_rate=0.3))
        wait_stored(sink, topic, truth.last_offsets)
        owned = [w.runner.worker.processor for w in (w1, w2)]  # type: ignore[union-attr]
        assert all(any(p.assigned(i) for i in range(4)) for p in owned)  # both got partitions
    finally:
        w2.stop()
        w1.stop()
    check(store, truth, meters)


def test_start_without_ready_partitions_fails_with_a_clear_error(
    setup, store, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """`tally run` must not serve an API whose events are never stored: a worker that gets no
    ready partitions in time (here: no broker listens at the address) raises WorkerStartError,
    and its status says stopped."""
    from runtime.broker import free_port
    from streams.worker import WorkerStartError

    settings, sink, *_ = setup
    settings = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    runner = WorkerRunner(settings, sink, dedupe_dir=tmp_path / "dedupe")
    with pytest.raises(WorkerStartError, match="the stream worker") as exc:
        runner.start_or_fail(5.0)
    assert "KafkaConnectionError" in exc.value.message or "no ready partitions" in exc.value.message
    assert not runner.running
    assert runner.status().state == "stopped"
