"""The link / verification / resync state machine of the commit protocol, against the in-memory
store of tests/unit/streams/fakes.py (which deduplicates link commits by chain token, like
ClickHouse with non_replicated_deduplication_window). No broker, no ClickHouse."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.worker import chain_token
from streams.dedupe import DedupeIndex, rebuild
from streams.processor import REUSE_READ_S, BatchProcessor, Verdict
from tests.unit.streams.fakes import MemorySink, meter
from tests.unit.streams.test_processor import T0, TOPIC, Clock, metric, payload, usage_total


class Mono:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(
    tmp: Path,
    sink: MemorySink | None = None,
    owner: str = "me",
    parts: int = 2,
    mono: Mono | None = None,
    reuse_read_s: float = REUSE_READ_S,
    ledger_executor: Executor | None = None,
    on_stored: Callable[[int, int], None] | None = None,
) -> tuple[BatchProcessor, MemorySink]:
    sink = sink or MemorySink([meter(aggregation="sum", value_property="$.v")])
    indexes: dict[int, DedupeIndex] = {}

    def index_for(p: int) -> DedupeIndex:
        if p not in indexes:
            indexes[p] = DedupeIndex.open(tmp, TOPIC, p)
        return indexes[p]

    proc = BatchProcessor(
        TOPIC,
        sink,
        index_for,
        clock_ms=Clock(),
        owner=owner,
        link_max_age_s=60.0,
        monotonic=mono or Mono(),
        reuse_read_s=reuse_read_s,
        ledger_executor=ledger_executor,
        on_stored=on_stored,
    )
    for p in range(parts):
        if owner:
            sink.write_claim(TOPIC, p, 10, owner)
        proc.assign(p, sink.progress(TOPIC).get(p, -1), 10)
    return proc, sink


def msg(eid: str, v: int = 1) -> bytes:
    return payload([(eid, T0, {"v": v})])


def attempt(proc: BatchProcessor) -> tuple[Any, Any]:
    proc.seal()
    links = proc.links()
    proc.prepare(links)
    out = proc.flush_batch(links)
    applied = proc.apply(out, links)
    # the running count of buffered events stays in step with the buffers
    real = sum(len(e.envelope) for b in proc._buffer.values() for e in b if e.envelope)
    assert proc.buffered_events == real
    return out, applied


# --- the token ---------------------------------------------------------------------------------


def test_chain_token_names_topic_partition_and_first_offset() -> None:
    assert chain_token("tally.events", 3, 0) == "tally.events/3/0"
    assert (
        chain_token("tally.events.g1700000000000", 0, 12345)
        == "tally.events.g1700000000000/0/12345"
    )
    assert chain_token("a", 1, 2) != chain_token("a", 12, 2)  # no ambiguity between fields
    with pytest.raises(ValueError, match="partition"):
        chain_token("t", -1, 0)
    with pytest.raises(ValueError, match="first"):
        chain_token("t", 0, -1)


def test_links_chain_from_the_known_chain_end(tmp_path: Path) -> None:
    proc, _ = make(tmp_path)
    proc.add(0, 0, msg("a"))
    proc.add(0, 1, msg("b"))
    proc.add(1, 4, msg("c"))  # a partition whose first message is offset 4
    links = proc.seal()
    assert [(k.partition, k.first, k.last, k.token) for k in links] == [
        (0, 0, 1, f"{TOPIC}/0/0"),
        (1, 0, 4, f"{TOPIC}/1/0"),
    ]
    proc.prepare(links)
    out = proc.flush_batch(links)
    assert out.verdicts == {0: (Verdict.STORED, 1), 1: (Verdict.STORED, 4)}
    applied = proc.apply(out, links)
    assert [e.offset for e in applied.acks] == [0, 1, 4]
    proc.add(0, 2, msg("d"))
    (nxt,) = proc.seal()
    assert (nxt.first, nxt.last, nxt.token) == (2, 2, f"{TOPIC}/0/2")


def test_windows_are_per_partition(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a", 2))
    proc.add(1, 0, msg("b", 3))  # same tenant, customer, minute: one window, two links
    proc.flush()
    usage = [r for r in sink.usage if r[1] == "id-m"]
    assert len(usage) == 2  # not merged across partitions; queries sum them
    assert usage_total(sink)["sum"] == Decimal(5)


# --- faults at each step -----------------------------------------------------------------------


def test_insert_fails_before_landing_retry_same_link(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a"))
    sink.fail_next = 1
    out, applied = attempt(proc)
    assert out.verdicts[0] == (Verdict.UNKNOWN, -1) and applied.unresolved == [0]
    assert not applied.acks and proc.held_messages == 1
    proc.add(0, 1, msg("b"))  # arrives while the link is sealed: waits behind it
    (link,) = proc.links()
    assert (link.first, link.last) == (0, 0)
    out, applied = attempt(proc)
    assert applied.stored == {0: 0}
    assert proc.flush() == {0: 1}
    assert usage_total(sink)["events"] == 2 and sink.commits == 2


def test_answer_lost_is_verified_stored_without_second_insert(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a"))
    sink.fail_after_next = 1
    out, applied = attempt(proc)
    assert isinstance(out.error, TimeoutError)
    assert applied.stored == {0: 0} and [e.offset for e in applied.acks] == [0]
    assert sink.link_calls == 1 and usage_total(sink)["events"] == 1


def test_answer_lost_and_next_check_failing_ends_exact(tmp_path: Path) -> None:
    """The issue's case 1: the insert lands, its answer is lost AND the check read fails."""
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a", 7))
    sink.fail_after_next = 1
    proc.seal()
    links = proc.links()
    proc.prepare(links)
    # make the verification read (the 2nd read of the attempt) fail
    real = sink.read_chain
    calls = {"n": 0}

    def flaky(topic: str, parts: list[int], since: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("check failed")
        return real(topic, parts, since)

    sink.read_chain = flaky  # type: ignore[method-assign]
    out = proc.flush_batch(links)
    applied = proc.apply(out, links)
    assert out.verdicts[0][0] is Verdict.UNKNOWN  # never "not landed"
    assert applied.unresolved == [0] and not applied.acks
    # retry: the pre-read sees the chain at the link's end: stored, nothing inserted again
    out, applied = attempt(proc)
    assert applied.stored == {0: 0}
    assert sink.link_calls == 1
    assert usage_total(sink) == {"events": 1, "sum": Decimal(7), "windows": 1}


def test_answer_lost_and_every_read_failing_then_retry_insert_is_a_no_op(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a", 7))
    proc.seal()
    links = proc.links()
    proc.prepare(links)
    sink.fail_after_next = 1
    real = sink.read_chain
    calls = {"n": 0}

    def flaky(topic: str, parts: list[int], since: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] in (2, 3):  # the check, then the next attempt's pre-read
            raise ConnectionError("store flapping")
        return real(topic, parts, since)

    sink.read_chain = flaky  # type: ignore[method-assign]
    for _ in range(2):
        out = proc.flush_batch(links)
        assert proc.apply(out, links).unresolved == [0]
    out = proc.flush_batch(links)
    assert proc.apply(out, links).stored == {0: 0}
    assert usage_total(sink)["events"] == 1


def test_insert_landing_after_the_client_timeout(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a", 5))
    proc.add(0, 1, msg("b", 6))
    sink.late_next = 1
    _, applied = attempt(proc)
    assert applied.unresolved == [0]  # not landed yet: unknown
    # the retry lands first; the late insert (same token) then lands as a no-op
    _, applied = attempt(proc)
    assert applied.stored == {0: 1}
    sink.land_late()
    assert sink.deduplicated == 1
    assert usage_total(sink)["events"] == 2


def test_late_insert_landing_before_the_retry(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a", 5))
    sink.late_next = 1
    attempt(proc)
    proc.add(0, 1, msg("b", 6))
    sink.land_late()  # lands while the worker backs off
    _, applied = attempt(proc)
    assert applied.stored == {0: 0} and sink.link_calls == 1  # seen by the pre-read
    proc.flush()
    assert usage_total(sink)["events"] == 2


def test_events_insert_failing_retries_the_link(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a"))
    sink.fail_events_next = 1
    _, applied = attempt(proc)
    assert applied.unresolved == [0] and sink.link_calls == 0
    assert proc.flush() == {0: 0}
    assert usage_total(sink)["events"] == 1


def test_index_rebuild_failing_during_resync_is_retried(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a"))
    proc.add(0, 1, msg("b"))
    sink.other_writer(TOPIC, 0, 0, 0, [])  # someone stored [0, 0]
    sink.insert_events([])
    real = sink.seen_ids

    def broken(*a: Any) -> Any:
        raise ConnectionError("rebuild read failed")

    sink.seen_ids = broken  # type: ignore[method-assign]
    _, applied = attempt(proc)
    assert applied.unresolved == [0] and not applied.acks
    sink.seen_ids = real  # type: ignore[method-assign]
    _, applied = attempt(proc)
    assert applied.resynced == {0: 0}


# --- another writer: resync --------------------------------------------------------------------


def test_other_writer_covering_part_of_the_link_resyncs(tmp_path: Path) -> None:
    """A zombie (or the new owner) extended the chain from the same point, to offset 1."""
    proc, sink = make(tmp_path)
    for off, eid in enumerate("abcd"):
        proc.add(0, off, msg(eid, off + 1))
    # the other writer's link [0, 1]: its events and usage (the same values: a=1, b=2)
    other, _ = make(tmp_path / "other", sink=sink, owner="")
    other.add(0, 0, msg("a", 1))
    other.add(0, 1, msg("b", 2))
    other.flush()
    _, applied = attempt(proc)
    assert applied.resynced == {0: 1}
    assert [e.offset for e in applied.acks] == [0, 1]
    (link,) = proc.seal()  # the rest, recomputed from M + 1
    assert (link.first, link.last) == (2, 3)
    proc.flush()
    assert usage_total(sink) == {"events": 4, "sum": Decimal(10), "windows": 1}


def test_other_writer_beyond_the_link_acks_everything(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a", 1))
    other, _ = make(tmp_path / "other", sink=sink, owner="")
    for off, eid in enumerate("abc"):
        other.add(0, off, msg(eid, off + 1))
    other.flush()
    _, applied = attempt(proc)
    assert applied.resynced == {0: 2} and [e.offset for e in applied.acks] == [0]
    assert not proc.add(0, 1, msg("b", 2))  # redelivered, already stored: skipped
    assert not proc.add(0, 2, msg("c", 3))
    assert proc.add(0, 3, msg("d", 4))
    assert proc.flush() == {0: 3}
    assert usage_total(sink) == {"events": 4, "sum": Decimal(10), "windows": 1}
    return
    assert usage_total(sink) == {"events": 3, "sum": Decimal(6), "windows": 1}


def test_same_point_same_token_only_one_link_is_stored(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a", 1))
    proc.add(0, 1, msg("b", 2))
    proc.add(0, 2, msg("c", 3))
    proc.seal()
    links = proc.links()
    proc.prepare(links)
    # the other writer's link [0, 1] lands between our pre-read and our insert
    real = sink.commit_link

    def racing(*a: Any) -> None:
        sink.other_writer(TOPIC, 0, 0, 1, [("t1", "id-m", "c1", None, "", "s", {}, 2)])
        real(*a)  # same token: a no-op

    sink.commit_link = racing  # type: ignore[method-assign]
    out = proc.flush_batch(links)
    assert out.verdicts[0] == (Verdict.RESYNC, 1)
    assert sink.deduplicated == 1 and sink.commits == 1


def test_fenced_partition_is_dropped_without_ack(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a"))
    proc.add(1, 0, msg("b"))
    sink.write_claim(TOPIC, 1, 20, "new-owner")
    _, applied = attempt(proc)
    assert applied.fenced == [1] and applied.stored == {0: 0}
    assert [e.partition for e in applied.acks] == [0]
    assert not proc.assigned(1)
    assert sink.progress(TOPIC) == {0: 0}  # nothing of partition 1 committed


def test_without_owner_claims_are_ignored(tmp_path: Path) -> None:
    proc, sink = make(tmp_path, owner="")
    sink.write_claim(TOPIC, 0, 20, "someone")
    proc.add(0, 0, msg("a"))
    assert proc.flush() == {0: 0}


def test_revoked_partition_result_is_ignored(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a"))
    proc.seal()
    links = proc.links()
    proc.prepare(links)
    out = proc.flush_batch(links)  # in flight while the partition is revoked and re-assigned
    dropped = proc.revoke(0)
    assert [e.offset for e in dropped] == [0]
    proc.assign(0, -1, 11)
    applied = proc.apply(out, links)
    assert not applied.acks and not applied.stored
    # the new owner (here: the same worker, assigned with the stale progress -1) reads it again:
    # its link starts at 0, the same token as the landed one, so the pre-read already shows the
    # chain at its end: stored, nothing inserted twice
    proc.add(0, 0, msg("a"))
    assert proc.flush() == {0: 0}
    assert usage_total(sink)["events"] == 1 and sink.link_calls == 1


def test_link_too_old_is_redone_from_a_fresh_read(tmp_path: Path) -> None:
    mono = Mono()
    proc, sink = make(tmp_path, mono=mono)
    proc.add(0, 0, msg("a", 1))
    sink.fail_next = 1
    _, applied = attempt(proc)
    assert applied.unresolved == [0]
    proc.add(0, 1, msg("b", 2))
    mono.t += 61  # older than link_max_age_s
    out, applied = attempt(proc)
    assert out.verdicts[0] == (Verdict.RESYNC, -1) and sink.link_calls == 1
    (link,) = proc.seal()  # one new link with everything held, from a fresh read
    assert (link.first, link.last) == (0, 1)
    proc.flush()
    assert usage_total(sink) == {"events": 2, "sum": Decimal(3), "windows": 1}


def test_store_behind_the_verified_chain_is_not_written(tmp_path: Path) -> None:
    mono = Mono()
    proc, sink = make(tmp_path, mono=mono)
    proc.add(0, 0, msg("a"))
    proc.flush()
    sink._progress.clear()  # the store lost data (reset)
    mono.t += REUSE_READ_S + 0.1  # the next link reads first (within the window: see below)
    proc.add(0, 1, msg("b"))
    _, applied = attempt(proc)
    assert applied.unresolved == [0] and sink.link_calls == 1


# --- reusing the read after a stored link as the next link's read before ------------------------


def count_reads(sink: MemorySink) -> list[list[int]]:
    """The partitions of every ``read_chain`` call from now on."""
    calls: list[list[int]] = []
    real = sink.read_chain

    def counted(topic: str, partitions: list[int], since: Any = None) -> Any:
        calls.append(sorted(partitions))
        return real(topic, partitions, since)

    sink.read_chain = counted  # type: ignore[method-assign]
    return calls


def test_a_link_right_after_a_verified_one_skips_the_read_before(tmp_path: Path) -> None:
    mono = Mono()
    proc, sink = make(tmp_path, mono=mono)
    reads = count_reads(sink)
    proc.add(0, 0, msg("a", 1))
    out, applied = attempt(proc)
    assert not out.read_reused and applied.stored == {0: 0} and len(reads) == 2
    proc.add(0, 1, msg("b", 2))
    mono.t += REUSE_READ_S / 2
    out, applied = attempt(proc)
    # only the read after: the previous one showed the chain ending right before this link
    assert out.read_reused and applied.stored == {0: 1} and len(reads) == 3
    proc.add(0, 2, msg("c", 3))
    mono.t += REUSE_READ_S + 0.1  # that reading is too old now: read again
    out, applied = attempt(proc)
    assert not out.read_reused and applied.stored == {0: 2} and len(reads) == 5
    assert usage_total(sink) == {"events": 3, "sum": Decimal(6), "windows": 1}


def test_the_read_after_a_commit_reads_only_what_landed_since_the_read_before(
    tmp_path: Path,
) -> None:
    """Step (3) passes the state of step (0) as ``since``: a fresh read's, or the reused
    reading's (its mark from the read that verified the previous link)."""
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a", 1))
    out, applied = attempt(proc)  # nothing stored before: no progress to start from, full read
    assert applied.stored == {0: 0} and sink.since_reads == 0
    proc.add(0, 1, msg("b", 2))
    out, applied = attempt(proc)
    assert out.read_reused and applied.stored == {0: 1} and sink.since_reads == 1
    proc.add(0, 2, msg("c", 3))
    proc.add(1, 0, msg("d", 4))  # partition 1 has no progress yet: this read is full
    out, applied = attempt(proc)
    assert not out.read_reused and applied.stored == {0: 2, 1: 0} and sink.since_reads == 1
    proc.add(0, 3, msg("e", 5))
    proc.add(1, 1, msg("f", 6))
    out, applied = attempt(proc)
    assert applied.stored == {0: 3, 1: 1} and sink.since_reads == 2
    assert usage_total(sink) == {"events": 6, "sum": Decimal(21), "windows": 1}


def test_retries_and_links_after_a_failed_check_always_read_first(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a", 1))
    proc.flush()
    proc.add(0, 1, msg("b", 2))
    sink.fail_next = 1  # the reused-read attempt's insert fails
    out, applied = attempt(proc)
    assert out.read_reused and applied.unresolved == [0]
    reads = count_reads(sink)
    out, applied = attempt(proc)  # the retry: same link, read before
    assert not out.read_reused and applied.stored == {0: 1} and len(reads) == 2
    proc.add(0, 2, msg("c", 3))
    sink.fail_reads = 1  # the check after this reused-read attempt fails: unknown
    sink.fail_after_next = 1
    out, applied = attempt(proc)
    assert out.read_reused and applied.unresolved == [0]
    out, applied = attempt(proc)  # no verified reading to reuse: read before, already stored
    assert not out.read_reused and applied.stored == {0: 2}
    assert sink.commits == 3 and sink.deduplicated == 0
    assert usage_total(sink) == {"events": 3, "sum": Decimal(6), "windows": 1}


def test_one_link_without_a_fresh_reading_makes_the_flush_read(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a"))
    proc.flush()
    proc.add(0, 1, msg("b"))
    proc.add(1, 0, msg("c"))  # partition 1 has no verified reading yet
    reads = count_reads(sink)
    out, applied = attempt(proc)
    assert not out.read_reused and reads[0] == [0, 1]
    assert applied.stored == {0: 1, 1: 0}


def test_reuse_off_reads_before_every_attempt(tmp_path: Path) -> None:
    proc, sink = make(tmp_path, reuse_read_s=0)
    reads = count_reads(sink)
    for off, eid in enumerate("abc"):
        proc.add(0, off, msg(eid))
        out, _ = attempt(proc)
        assert not out.read_reused
    assert len(reads) == 6


def test_a_new_owner_inside_the_window_is_seen_after_one_insert(tmp_path: Path) -> None:
    proc, sink = make(tmp_path)
    proc.add(0, 0, msg("a", 1))
    proc.flush()
    # a new owner claims partition 0 and stores [1, 2] before this worker's next link [1, 1]
    other, _ = make(tmp_path / "other", sink=sink, owner="", parts=0)
    sink.write_claim(TOPIC, 0, 20, "new-owner")
    rebuild(other.index_for(0), sink, TOPIC, 0, 0, Clock()(), other.horizon_ms)
    other.assign(0, 0)
    other.add(0, 1, msg("b", 2))
    other.add(0, 2, msg("c", 3))
    assert other.flush() == {0: 2}
    proc.add(0, 1, msg("b", 2))
    out, applied = attempt(proc)
    # the insert goes out without a read (same token as the new owner's link: a no-op), and the
    # read after it shows the claim: fenced, nothing acked
    assert out.read_reused and sink.deduplicated == 1
    assert applied.fenced == [0] and not applied.acks and not proc.assigned(0)
    assert usage_total(sink) == {"events": 3, "sum": Decimal(6), "windows": 1}


def test_another_writer_from_the_same_point_inside_the_window_resyncs(tmp_path: Path) -> None:
    proc, sink = make(tmp_path, owner="")
    proc.add(0, 0, msg("a", 1))
    proc.flush()
    other, _ = make(tmp_path / "other", sink=sink, owner="", parts=0)
    rebuild(other.index_for(0), sink, TOPIC, 0, 0, Clock()(), other.horizon_ms)
    other.assign(0, 0)
    for off, eid in ((1, "b"), (2, "c")):
        other.add(0, off, msg(eid, off + 1))
    assert other.flush() == {0: 2}
    proc.add(0, 1, msg("b", 2))
    out, applied = attempt(proc)
    assert out.read_reused and sink.deduplicated == 1 and sink.since_reads >= 1
    assert applied.resynced == {0: 2} and [e.offset for e in applied.acks] == [1]
    assert usage_total(sink) == {"events": 3, "sum": Decimal(6), "windows": 1}


# --- the ledger inserted while the windows are computed --------------------------------------


class ThreadedSink(MemorySink):
    """Records the thread of every ledger insert."""

    def __init__(self) -> None:
        super().__init__([meter(aggregation="sum", value_property="$.v")])
        self.events_threads: list[str] = []

    def insert_events(self, events: Any) -> None:
        self.events_threads.append(threading.current_thread().name)
        super().insert_events(events)


@pytest.fixture
def ledger_thread() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1, thread_name_prefix="test-ledger") as executor:
        yield executor


def test_ledger_rows_inserted_while_preparing_are_not_inserted_again(
    tmp_path: Path, ledger_thread: ThreadPoolExecutor
) -> None:
    proc, sink = make(tmp_path, ThreadedSink(), ledger_executor=ledger_thread)
    assert isinstance(sink, ThreadedSink)
    proc.add(0, 0, msg("a", 2))
    proc.add(0, 1, msg("a", 5))  # a retry of "a": the first copy is kept
    proc.add(1, 0, msg("b", 3))
    links = proc.seal()
    proc.prepare(links)
    # the links' rows in ONE insert, on the ledger thread, before any commit
    assert sink.events_threads == ["test-ledger_0"] and sink.commits == 0
    assert set(sink.events) == {("t1", "a"), ("t1", "b")}
    assert all(k.ledger_ahead for k in links)
    out = proc.flush_batch(links)
    assert sink.events_inserts == 1  # the first attempt does not insert them again
    applied = proc.apply(out, links)
    assert applied.stored == {0: 1, 1: 0}
    assert usage_total(sink)["events"] == 2 and usage_total(sink)["sum"] == Decimal(5)
    assert metric(proc, "tally_worker_flush_rows", table="events") == 2  # counted once


def test_ledger_insert_failing_while_preparing_is_done_by_the_attempt(
    tmp_path: Path, ledger_thread: ThreadPoolExecutor
) -> None:
    proc, sink = make(tmp_path, ledger_executor=ledger_thread)
    proc.add(0, 0, msg("a"))
    sink.fail_events_next = 1  # the insert ahead fails: not an error of the attempt
    out, applied = attempt(proc)
    assert out.error is None and applied.stored == {0: 0}
    assert sink.events_inserts == 1 and set(sink.events) == {("t1", "a")}
    assert metric(proc, "tally_worker_flush_rows", table="events") == 1
    assert proc.ledger_ahead_failures == 1
    assert metric(proc, "tally_worker_store_errors") == 1  # seen, though the attempt was fine


def test_a_retry_inserts_the_ledger_rows_again(
    tmp_path: Path, ledger_thread: ThreadPoolExecutor
) -> None:
    proc, sink = make(tmp_path, ledger_executor=ledger_thread)
    proc.add(0, 0, msg("a"))
    sink.fail_next = 1  # the commit insert fails before landing
    _, applied = attempt(proc)
    assert applied.unresolved == [0] and sink.events_inserts == 1
    _, applied = attempt(proc)  # the same link, prepared once: its rows are sent again
    assert applied.stored == {0: 0} and sink.events_inserts == 2
    assert usage_total(sink)["events"] == 1 and set(sink.events) == {("t1", "a")}


# --- what the store holds, told at once (wait=stored) ----------------------------------------


def test_stored_links_are_told_before_the_index_gets_their_ids(tmp_path: Path) -> None:
    told: list[tuple[int, int, set[Any]]] = []

    def on_stored(p: int, offset: int) -> None:
        # called on the flush thread right after the read: the index does not hold them yet
        known = proc.index_for(p).contains_many([("t1", "a"), ("t1", "b")])
        told.append((p, offset, known))

    proc, _ = make(tmp_path, on_stored=on_stored)
    proc.add(0, 0, msg("a"))
    proc.add(0, 1, msg("a"))  # a copy: the link ends at 1
    proc.add(1, 0, msg("b"))
    _, applied = attempt(proc)
    assert told == [(0, 1, set()), (1, 0, set())]
    assert applied.progress == {0: 1, 1: 0}  # what the caller reports afterwards: the same
    assert proc.index_for(0).contains_many([("t1", "a")]) == {("t1", "a")}


def test_only_what_a_read_shows_stored_is_told(tmp_path: Path) -> None:
    told: list[tuple[int, int]] = []
    proc, sink = make(tmp_path, on_stored=lambda p, off: told.append((p, off)))
    proc.add(0, 0, msg("a"))
    proc.add(1, 0, msg("b"))
    sink.write_claim(TOPIC, 1, 20, "new-owner")  # partition 1 is fenced: never told
    sink.fail_next = 1  # the commit insert fails before landing: nothing stored, nothing told
    _, applied = attempt(proc)
    assert applied.fenced == [1] and applied.unresolved == [0] and told == []
    _, applied = attempt(proc)
    assert applied.stored == {0: 0} and told == [(0, 0)]


def test_a_resync_tells_the_stores_chain_end(tmp_path: Path) -> None:
    told: list[tuple[int, int]] = []
    proc, sink = make(tmp_path, on_stored=lambda p, off: told.append((p, off)))
    for off, eid in enumerate("abcd"):
        proc.add(0, off, msg(eid, off + 1))
    other, _ = make(tmp_path / "other", sink=sink, owner="")  # another writer's link [0, 1]
    other.add(0, 0, msg("a", 1))
    other.add(0, 1, msg("b", 2))
    other.flush()
    _, applied = attempt(proc)
    assert applied.resynced == {0: 1} and told == [(0, 1)]
    proc.flush()
    assert told == [(0, 1), (0, 3)]


def test_a_failing_listener_changes_nothing_of_the_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def on_stored(p: int, offset: int) -> None:
        raise RuntimeError("listener down")

    proc, _ = make(tmp_path, on_stored=on_stored)
    proc.add(0, 0, msg("a"))
    out, applied = attempt(proc)
    assert out.error is None and applied.stored == {0: 0}
    assert [e.offset for e in applied.acks] == [0]
    assert proc.index_for(0).contains_many([("t1", "a")]) == {("t1", "a")}
    assert "listener down" in caplog.text


# --- the invariant -----------------------------------------------------------------------------

step_st = st.tuples(
    st.integers(0, 2),  # partition
    st.lists(st.tuples(st.integers(0, 20), st.integers(1, 9)), min_size=1, max_size=4),
    st.sampled_from(
        ["none", "none", "before", "after", "late", "read", "read2", "events", "other", "land"]
    ),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(step_st, max_size=30), st.sampled_from([0.0, REUSE_READ_S]), st.booleans())
def test_exactly_once_under_every_fault(
    tmp_path_factory, ledger_thread, steps, reuse, ahead
) -> None:  # type: ignore[no-untyped-def]
    """Random messages, attempts and faults (insert fails, answer lost, lands late, reads fail,
    another writer extends the chain from the same point): every id counts exactly once, with
    and without reusing a verified read (the fixed clock keeps every reading fresh), with the
    ledger inserted while preparing or by the attempt."""
    tmp = tmp_path_factory.mktemp("links")
    proc, sink = make(
        tmp, parts=3, reuse_read_s=reuse, ledger_executor=ledger_thread if ahead else None
    )
    other, _ = make(tmp / "other", sink=sink, owner="", parts=3)
    offsets = dict.fromkeys(range(3), -1)
    log: dict[int, list[tuple[int, bytes]]] = {p: [] for p in range(3)}
    truth: dict[str, int] = {}
    for p, evs, fault in steps:
        offsets[p] += 1
        evs = [(f"p{p}-{i}", v) for i, v in evs]
        for eid, v in evs:
            truth.setdefault(eid, v)
        body = payload([(eid, T0, {"v": v}) for eid, v in evs])
        log[p].append((offsets[p], body))
        proc.add(p, offsets[p], body)
        if fault == "before":
            sink.fail_next = 1
        elif fault == "after":
            sink.fail_after_next = 1
        elif fault == "late":
            sink.late_next = 1
        elif fault == "read":
            sink.fail_reads = 1
        elif fault == "read2":
            sink.fail_reads = 2
        elif fault == "events":
            sink.fail_events_next = 1
        elif fault == "land":
            sink.land_late()
        elif fault == "other":
            # another writer reads the store and extends the chain with what Kafka holds
            m = sink.progress(TOPIC).get(p, -1)
            if other.assigned(p):
                other.revoke(p)
            # a new owner: dedupe index brought up to the store's progress, then assigned
            rebuild(other.index_for(p), sink, TOPIC, p, m, Clock()(), other.horizon_ms)
            other.assign(p, m)
            for off, b in log[p]:
                other.add(p, off, b)
            sink.fail_next = sink.fail_after_next = sink.late_next = 0
            sink.fail_reads = sink.fail_events_next = 0
            other.flush()
            continue
        attempt(proc)
    sink.fail_next = sink.fail_after_next = sink.late_next = 0
    sink.fail_reads = sink.fail_events_next = 0
    sink.land_late()
    proc.flush()
    sink.land_late()
    assert proc.held_messages == 0 and proc.buffered_events == 0
    assert {p: o for p, o in offsets.items() if o >= 0} == {
        p: sink.progress(TOPIC).get(p, -1) for p, o in offsets.items() if o >= 0
    }
    tot = usage_total(sink)
    assert tot["events"] == len(truth)
    assert tot["sum"] == sum(truth.values())
    assert set(sink.events) == {("t1", eid) for eid in truth}
