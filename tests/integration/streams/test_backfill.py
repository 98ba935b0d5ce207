"""Backfill runs on real chDB: exact history, exclusive per meter, atomic, resumable.

Ground truth: ``tests.integration.streams.history`` (plain Python over the stored events).
"""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from typing import Any

import pytest

from clickhouse.backfill import BackfillStore, checkpoint_meter
from clickhouse.repo import Repo
from clickhouse.store import Store
from schemas.backfill import COMPLETE, NOTHING_TO_DO
from schemas.meters import MeterSpec
from streams.backfill import BackfillResult, BackfillRunner, LiveTopic, Progress
from tally.errors import Conflict, Unavailable
from tests.integration.streams.history import History, make_history


def runner(h: History, **kw: Any) -> BackfillRunner:
    kw.setdefault("live", None)
    kw.setdefault("chunk_events", 40)
    kw.setdefault("lease_s", 2.0)
    return BackfillRunner(BackfillStore(h.store), h.meter, **kw)


def origins(store: Store, tenant: str) -> set[tuple[str, str]]:
    rows = store.query_rows(
        f"SELECT DISTINCT meter_id, origin FROM {store.database}.usage_backfill "
        "WHERE tenant_id = {t:String}",
        {"t": tenant},
    )
    return {(str(m), str(o)) for m, o in rows}


def test_history_counts_once_and_a_rerun_replaces_it(store: Store) -> None:
    h = make_history(store)
    before = h.totals()
    assert before != h.truth()  # the stream alone misses the history
    seen: list[Progress] = []
    first = runner(h, on_progress=seen.append).run()
    assert first.state == COMPLETE and not first.resumed
    assert first.events_scanned == first.events_total == len(h.backfill_side())
    assert first.events_matched == first.events_scanned and first.value_problems == 0
    assert first.chunks == -(-first.events_scanned // 40)
    assert h.totals() == h.truth()
    assert seen[-1].phase == "scanning" and seen[-1].done == first.events_scanned
    second = runner(h, chunk_events=1000).run()  # re-run: replaces, never adds
    assert second.run_id != first.run_id and second.events_scanned == first.events_scanned
    assert h.totals() == h.truth()
    m = h.meter.id
    assert origins(store, h.tenant) == {
        (m, f"b:{second.run_id}"),
        (checkpoint_meter(m), f"b:{second.run_id}"),
    }  # the replaced run's rows are gone


def test_live_topic_waits_for_the_worker_to_pass_every_marker(store: Store) -> None:
    h = make_history(store)
    bs = BackfillStore(store)
    live = LiveTopic(h.topic, 5)  # partition 4: the worker has not processed its marker yet
    r = runner(h, live=live, wait_s=1.0, poll_s=0.05)
    with pytest.raises(Unavailable, match=r"partition\(s\) \[4\].*Is the worker running"):
        r.run()
    (failed,) = bs.list_runs(h.tenant, h.meter.id)
    assert failed.state == "failed" and "[4]" in failed.error
    assert h.totals() != h.truth()  # nothing visible changed
    # the worker passes the marker of partition 4 (activation row, then progress past it)
    from clickhouse.sink import ClickHouseSink

    sink = ClickHouseSink(store)
    sink.record_activations([(h.tenant, h.meter.id, h.topic, 4, 0)])
    sink.commit(h.topic, [], [], {4: 0})
    result = runner(h, live=live, wait_s=5.0).run()  # the failed run does not block it
    assert result.state == COMPLETE and h.totals() == h.truth()


def test_meter_without_activation_topic_has_nothing_to_backfill(store: Store) -> None:
    repo = Repo(store)
    t, _ = repo.create_tenant("x")
    legacy = repo.create_meter(
        t.tenant_id,
        MeterSpec(slug="c", event_type="e", aggregation="count"),  # type: ignore[arg-type]
    )
    res = BackfillRunner(BackfillStore(store), legacy, live=None).run()
    assert res.state == NOTHING_TO_DO and res.run_id == ""
    assert BackfillStore(store).list_runs(t.tenant_id, legacy.id) == []


def test_concurrent_backfills_of_one_meter_one_runs_the_other_gets_409(store: Store) -> None:
    h = make_history(store)
    # 1. a tight race: several invocations acquire at the same instant
    barrier = threading.Barrier(4)
    results: list[BackfillResult] = []
    conflicts: list[Conflict] = []
    all_refused = threading.Event()

    def hold_until_refused(chunk: int) -> None:  # the winner waits for the others' answers
        if chunk == 1:
            all_refused.wait(60)

    def go() -> None:
        r = runner(h, on_chunk=hold_until_refused)
        acquire = r._acquire

        def synchronized() -> tuple[str, bool]:
            barrier.wait()
            return acquire()

        r._acquire = synchronized  # type: ignore[method-assign]
        try:
            results.append(r.run())
        except Conflict as exc:
            conflicts.append(exc)
            if len(conflicts) == 3:
                all_refused.set()

    threads = [threading.Thread(target=go) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert len(results) == 1 and len(conflicts) == 3, (results, conflicts)
    assert all("already running" in c.message and results[0].run_id in c.message for c in conflicts)
    assert h.totals() == h.truth()
    # 2. a second invocation while a run is in the middle of its chunks
    gate, release = threading.Event(), threading.Event()

    def pause(chunk: int) -> None:
        if chunk == 2:
            gate.set()
            release.wait(60)

    first = runner(h, on_chunk=pause)
    out: list[BackfillResult] = []
    th = threading.Thread(target=lambda: out.append(first.run()))
    th.start()
    assert gate.wait(60)
    with pytest.raises(Conflict) as info:
        runner(h).run()
    assert info.value.details[0]["field"] == "run_id"
    running = info.value.details[0]["message"]
    assert h.totals() == h.truth()  # the half-written run is not visible
    release.set()
    th.join(60)
    assert out and out[0].run_id == running and h.totals() == h.truth()


class Crash(BaseException):
    """Stands for kill -9: nothing of the runner's error handling runs."""


def test_crashed_backfill_keeps_the_previous_run_visible_and_is_resumed(store: Store) -> None:
    h = make_history(store, n=800)
    previous = runner(h).run()
    assert h.totals() == h.truth()

    def crash_after_3(chunk: int) -> None:
        if chunk == 3:
            raise Crash

    with pytest.raises(Crash):
        runner(h, lease_s=5.0, on_chunk=crash_after_3).run()
    bs = BackfillStore(store)
    crashed = bs.list_runs(h.tenant, h.meter.id)[-1]
    assert crashed.state == "running" and crashed.chunks == 3
    assert h.totals() == h.truth()  # the previous complete run, nothing double
    assert bs.visible_run(h.tenant, h.meter.id) == previous.run_id
    with pytest.raises(Conflict, match=crashed.run_id):  # its lease has not expired yet
        runner(h, lease_s=5.0).run()
    assert h.totals() == h.truth()
    time.sleep(max(0.0, crashed.heartbeat_ms / 1000 + 5.5 - time.time()))  # lease expires
    resumed = runner(h, lease_s=5.0, chunk_events=7).run()  # its own chunk size is kept
    assert resumed.resumed and resumed.run_id == crashed.run_id
    assert resumed.events_scanned == previous.events_scanned
    assert resumed.chunks == previous.chunks
    assert h.totals() == h.truth()
    checkpoints = bs.checkpoints(h.tenant, h.meter.id, resumed.run_id)
    assert [c.chunk for c in checkpoints] == list(range(1, resumed.chunks + 1))
    assert sum(c.scanned for c in checkpoints) == len(h.backfill_side())
    assert {o for _m, o in origins(store, h.tenant)} == {f"b:{resumed.run_id}"}


def test_an_error_releases_the_lease_so_the_next_run_resumes_at_once(store: Store) -> None:
    h = make_history(store)

    def fail_after_2(chunk: int) -> None:
        if chunk == 2:
            raise ConnectionError("store went away")

    with pytest.raises(ConnectionError):
        runner(h, lease_s=600, on_chunk=fail_after_2).run()
    res = runner(h, lease_s=600).run()
    assert res.resumed and h.totals() == h.truth()


def test_a_run_that_lost_its_lock_stops(store: Store) -> None:
    h = make_history(store)
    taken = threading.Event()

    def stall(chunk: int) -> None:
        if chunk == 1:
            taken.wait(60)  # frozen (a zombie) while another invocation takes over

    zombie = runner(h, lease_s=1.0, on_chunk=stall)
    zombie._heartbeat = lambda: None  # type: ignore[method-assign]  # frozen: no heartbeats
    errors: list[BaseException] = []

    def run_zombie() -> None:
        try:
            zombie.run()
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=run_zombie)
    th.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(1.2)
        try:
            took_over = runner(h, lease_s=1.0).run()
            break
        except Conflict:
            continue
    assert took_over.resumed
    taken.set()
    th.join(60)
    assert len(errors) == 1 and isinstance(errors[0], Conflict), errors
    assert "lost its lock" in str(errors[0])
    assert h.totals() == h.truth()
    assert sum(h.totals().values(), Decimal(0)) == sum(h.truth().values(), Decimal(0))
