"""The commit protocol under store faults: real Tansu broker, real chDB, the real ClickHouseSink
on a store wrapper that injects faults at every step of the commit order
(tests/support/faulty_store.py). Every test ends with usage totals equal to the independent
ground truth of tests/integration/streams/helpers.py: nothing lost, nothing counted twice."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store
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


# Each plan arms faults on the wrapper; "skip" lets the first matching operations through, so
# the faults hit the steady state (links of later flushes), not only the first one.
PLANS: dict[str, list[dict[str, Any]]] = {
    # (a) the ledger insert
    "events-insert-fails": [dict(op="insert", table="events", skip=1, times=2)],
    "events-insert-answer-lost": [dict(op="insert", mode="after", table="events", skip=1)],
    # (c) the commit point
    "link-insert-fails": [dict(op="insert", table="usage_minute", skip=2, times=2)],
    "link-insert-answer-lost": [dict(op="insert", mode="after", table="usage_minute", skip=2)],
    # the case 1: the insert lands, its answer is lost AND the next check fails
    "answer-lost-and-check-fails": [
        dict(
            op="insert",
            mode="after",
            table="usage_minute",
            skip=2,
            then=[dict(op="chain", times=3)],
        )
    ],
    # the insert lands after the client gave up (while the worker retries the same link)
    "insert-lands-after-timeout": [
        dict(op="insert", mode="late", table="usage_minute", skip=2, delay=1.5)
    ],
    "late-insert-and-check-fails": [
        dict(
            op="insert",
            mode="late",
            table="usage_minute",
            skip=3,
            delay=0.8,
            then=[dict(op="chain", times=2)],
        )
    ],
    # (0)/(d) the progress + claims reads
    "chain-reads-fail": [dict(op="chain", skip=4, times=3)],
    # partition set-up: the claim write and the progress read
    "claim-write-fails": [dict(op="insert", table="worker_claims", times=2)],
    # preparing a link: the first meters load fails (the link waits and is retried) ...
    "meters-first-load-fails": [dict(op="meters", times=2)],
    # ... a later reload fails (the last loaded meters are used; markers carry their meter)
    "meters-reload-fails": [dict(op="meters", skip=1, times=2)],
}


@pytest.mark.parametrize("plan", list(PLANS))
def test_fault_at_each_commit_step_ends_exact(
    plan: str, setup: Any, broker: Any, topic: str, store: Store, tmp_path: Path
) -> None:
    settings, sink, truth, meters, src = setup
    faulty = FaultyStore(store)
    faults = [faulty.arm(**spec) for spec in PLANS[plan]]
    produce(broker.bootstrap, topic, truth, src.batch(600))
    with Worker(settings, ClickHouseSink(faulty), tmp_path / "dedupe") as w:
        for _ in range(3):
            produce(broker.bootstrap, topic, truth, src.batch(400, dup_rate=0.3))
            time.sleep(0.3)
        # a meters reload happens every 2 s: keep events flowing until every fault has fired
        deadline = time.monotonic() + 60
        while any(f.hits < f.times for f in faulty.faults) and time.monotonic() < deadline:
            produce(broker.bootstrap, topic, truth, src.batch(50, dup_rate=0.3))
            time.sleep(0.5)
        wait_stored(sink, topic, truth.last_offsets)
        worker = w.runner.worker
        assert worker is not None
    faulty.wait_late()
    for f in faulty.faults:  # every armed fault (also the chained ones) really fired
        assert f.hits == f.times, (plan, f)
    assert faults
    if plan == "events-insert-answer-lost":
        # the ledger insert made while the link was prepared lost its answer (every insert of
        # the ledger is one of those while no attempt fails): the attempt inserted the rows again
        assert worker.processor.ledger_ahead_failures >= 1 and worker.attempt_failures == 0
    elif plan != "meters-reload-fails":  # a failed reload is absorbed by the meter cache
        assert worker.attempt_failures >= 1  # the worker saw the failure and retried
    if plan.startswith(("insert-lands", "late-insert")):
        # the late insert executed after the worker had stored the link itself or adopted it
        outcomes = [r.outcome for r in faulty.log]
        assert "late-landed" in outcomes, outcomes
    check(store, truth, meters)


def test_index_rebuild_reads_failing_on_set_up(
    setup: Any, broker: Any, topic: str, store: Store, tmp_path: Path
) -> None:
    """A new worker without the local index must rebuild it from the store; the reads fail
    first: the set-up backs off and retries, retries of stored ids are still duplicates."""
    settings, sink, truth, meters, src = setup
    produce(broker.bootstrap, topic, truth, src.batch(1_500))
    with Worker(settings, sink, tmp_path / "dedupe-a"):
        wait_stored(sink, topic, truth.last_offsets)
    faulty = FaultyStore(store)
    fault = faulty.arm("seen", times=3)
    produce(broker.bootstrap, topic, truth, src.batch(1_500, dup_rate=0.6))
    with Worker(settings, ClickHouseSink(faulty), tmp_path / "dedupe-b") as w:
        wait_stored(sink, topic, truth.last_offsets)
        assert w.runner.worker is not None and w.runner.worker.attempt_failures >= 1
    assert fault.hits == 3
    check(store, truth, meters)


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.parametrize("fencing", [True, False], ids=["claims+tokens", "tokens-only"])
def test_store_down_past_session_timeout_while_second_worker_takes_over(
    fencing: bool, setup: Any, broker: Any, topic: str, store: Store, tmp_path: Path
) -> None:
    """Worker A cannot reach the store and holds sealed links for every partition; worker B
    joins and takes some partitions over while A's store stays down past the session timeout.
    A is made a zombie: it never learns that it lost them (its revocation handler is
    disconnected, which is what an eviction does to a worker that was frozen or stuck in its
    handler, the old hole). B claims its partitions, reads the store and commits A's held offsets.
    When the store answers A again, A must commit nothing conflicting: with claims it is fenced
    before writing anything; with tokens only, its pre-read shows the chain already past its
    links' start (any insert would carry the token of B's link from the same point: a no-op) and
    it resyncs. (Tansu does not evict a frozen member from the group, so freezing A would not
    make a zombie here.)"""
    settings, sink, truth, meters, src = setup
    faulty_a = FaultyStore(store)
    a = Worker(settings, ClickHouseSink(faulty_a), tmp_path / "dedupe-a")
    a.runner.fencing = fencing
    a.runner.worker_id = "worker-a"
    produce(broker.bootstrap, topic, truth, src.batch(1_000))
    a.start()
    wa = a.runner.worker
    assert wa is not None and a.runner.loop is not None
    b: Worker | None = None
    try:
        wait_stored(sink, topic, truth.last_offsets)
        faulty_a.down = True  # A's store is unreachable
        down_at = time.monotonic()
        produce(broker.bootstrap, topic, truth, src.batch(2_000, dup_rate=0.3))
        _wait(
            lambda: len(wa.processor.links()) == 4 and wa.failing_since_ms,
            60,
            "A holding sealed links for every partition",
        )
        held = {k.partition: (k.first, k.last) for k in wa.processor.links()}
        a.runner.loop.call_soon_threadsafe(
            wa.app.on_partitions_revoked.disconnect, wa.on_partitions_revoked
        )
        b = Worker(settings, sink, tmp_path / "dedupe-b")
        b.runner.worker_id = "worker-b"
        b.start()
        wb = b.runner.worker
        assert wb is not None
        _wait(lambda: wb.processor.partitions, 90, "B owning partitions")
        taken = set(wb.processor.partitions)
        # B commits A's held offsets of the partitions it took
        wait_stored(sink, topic, {p: held[p][1] for p in taken})
        # the store stays down for A for longer than the session timeout
        while time.monotonic() - down_at < settings.broker_session_timeout_s * 1.5:
            time.sleep(0.2)
        assert set(wa.processor.partitions) >= taken  # A still believes it owns them: a zombie
        stale_tokens = {f"{topic}/{p}/{held[p][0]}" for p in taken}
        restored_at = time.monotonic()
        faulty_a.down = False  # the store answers A again
        _wait(
            lambda: not any(k.partition in taken for k in wa.processor.links()),
            120,
            "A settling its stale links",
        )
        after = [r for r in faulty_a.log if r.at >= restored_at]
        stale = [(r.token, r.outcome) for r in after if r.token in stale_tokens]
        print(
            f"B took {sorted(taken)}; worker A after the store came back: fenced "
            f"{wa.fenced_total} partitions, stale link inserts {stale}"
        )
        assert not stale, stale  # never sent: fenced, or resolved by the pre-read
        if fencing:
            assert wa.fenced == taken and wa.fenced_total == len(taken)
            assert not set(wa.processor.partitions) & taken
        else:
            assert wa.fenced_total == 0
        # both go on; everything is stored once (A's own partitions are committed by A)
        produce(broker.bootstrap, topic, truth, src.batch(1_000, dup_rate=0.3))
        wait_stored(sink, topic, truth.last_offsets, timeout=180)
    finally:
        if b is not None:
            b.stop()
        a.stop()
    check(store, truth, meters)
