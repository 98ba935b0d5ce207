"""wait=stored in embedded mode: a waiting request makes the worker flush as soon as it has read
what the request waits for (``ProgressBoard.add_wake``), instead of at its flush interval.

The flush interval is set far beyond every deadline of the test: only the wake can get the events
stored in time, so a broken wake fails the test (it never measures a duration)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store
from streams.progress import ProgressBoard
from streams.worker import FETCH_MAX_WAIT_MS, WorkerRunner
from tests.integration.streams.helpers import (
    PARTITIONS,
    EventSource,
    Truth,
    create_meters,
    produce,
    stored_totals,
    worker_settings,
)

NEVER = 3600.0  # flush interval: no flush happens on its own during the test


def test_waiting_request_wakes_the_worker(
    broker: Any, topic: str, store: Store, unique: str, tmp_path: Path
) -> None:
    tenant, meters = create_meters(store)
    truth = Truth(tenant)
    src = EventSource(truth)
    settings = worker_settings(broker.bootstrap, topic, f"grp-{unique}", tmp_path)
    # beyond their validation: neither the interval nor the size triggers a flush here
    settings = settings.model_copy(update={"flush_interval_s": NEVER, "flush_max_events": 10**9})
    sink = ClickHouseSink(store)
    board = ProgressBoard()
    runner = WorkerRunner(settings, sink, board, dedupe_dir=tmp_path / "dedupe")
    assert runner.start(timeout=90)
    try:
        # 1. the request waits before the worker has read its events (woken by the read)
        first = {p: 0 for p in range(PARTITIONS)}
        result: list[bool] = []
        waiting = threading.Thread(
            target=lambda: result.append(asyncio.run(board.wait_for(topic, first, 60.0)))
        )
        waiting.start()
        produce(broker.bootstrap, topic, truth, src.batch(1_000))
        assert set(truth.last_offsets) == set(first)  # every partition got events
        waiting.join(90)
        assert result == [True]
        # 2. the request waits after the worker read them (woken by the wait itself)
        produce(broker.bootstrap, topic, truth, src.batch(1_000))
        assert asyncio.run(board.wait_for(topic, dict(truth.last_offsets), 60.0))
        assert sink.progress(topic) == truth.last_offsets
    finally:
        runner.stop(timeout=30)
    assert runner.error is None
    assert stored_totals(store, truth.tenant, meters) == truth.totals()


def test_the_consumer_fetch_wait_is_short(
    broker: Any, topic: str, store: Store, unique: str, tmp_path: Path
) -> None:
    """Faust asks for 1.5 s fetch waits, which the embedded broker serves in full: the worker's
    consumer must use ``FETCH_MAX_WAIT_MS`` instead (a Faust or aiokafka upgrade that moves the
    setting must fail here, not as a slow benchmark)."""
    settings = worker_settings(broker.bootstrap, topic, f"grp-{unique}", tmp_path)
    runner = WorkerRunner(settings, ClickHouseSink(store), None, dedupe_dir=tmp_path / "d")
    assert runner.start(timeout=90)
    try:
        app = runner.app
        assert app is not None
        consumer = app.consumer._thread._consumer  # type: ignore[attr-defined]
        assert consumer._fetch_max_wait_ms == FETCH_MAX_WAIT_MS
        assert consumer._fetcher._fetch_max_wait_ms == FETCH_MAX_WAIT_MS
    finally:
        runner.stop(timeout=30)
    assert runner.error is None
