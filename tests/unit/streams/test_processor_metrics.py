"""The worker's counters agree with a ground truth, also when commits fail and are retried
(BatchProcessor over the in-memory fake sink: pure)."""

from __future__ import annotations

import contextlib
import random
import tempfile
import zlib
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.processor import BatchProcessor
from tests.unit.streams.test_processor import ING, T0, make, payload


def count(proc: BatchProcessor, name: str, **labels: str) -> float:
    return proc.metrics.registry.get_sample_value(name, labels) or 0.0


def outcome(proc: BatchProcessor, which: str) -> float:
    return count(proc, "tally_worker_events_total", outcome=which)


@settings(max_examples=40, deadline=None)
@given(
    n_unique=st.integers(1, 120),
    dup_rate=st.floats(0, 0.6),
    per_message=st.integers(1, 9),
    failures=st.integers(0, 3),
    seed=st.integers(0, 10**6),
)
def test_stored_is_sent_minus_duplicates(
    n_unique: int, dup_rate: float, per_message: int, failures: int, seed: int
) -> None:
    """N events with D duplicates (in the same message, the same link, or a later link):
    consumed = N, duplicate = D, stored = N - D, whatever store failures happened."""
    rnd = random.Random(seed)
    ids = [f"e{i}" for i in range(n_unique)]
    sent = list(ids)
    for i in ids:
        if rnd.random() < dup_rate:
            sent.insert(rnd.randrange(len(sent) + 1), i)  # the copy may come first: fine
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as indexes_open:
        proc, sink, indexes = make(Path(d))
        # before the directory goes: the indexes' background threads (filter build, writes)
        # must not be left creating files in it
        indexes_open.callback(lambda: [idx.close() for idx in indexes.values()])
        offset: dict[int, int] = {}
        # every copy of an id goes to the same partition (the API partitions by hash of the id)
        by_part: dict[int, list[str]] = {}
        for e in sent:
            by_part.setdefault(zlib.crc32(e.encode()) % 4, []).append(e)
        queues = {
            p: [evs[i : i + per_message] for i in range(0, len(evs), per_message)]
            for p, evs in by_part.items()
        }
        while queues:  # partitions interleave at random; order within a partition is kept
            p = rnd.choice(sorted(queues))
            chunk = queues[p].pop(0)
            if not queues[p]:
                del queues[p]
            offset[p] = offset.get(p, -1) + 1
            proc.add(p, offset[p], payload([(e, T0, {}) for e in chunk]))
            if rnd.random() < 0.3:
                sink.fail_next = failures  # some commits fail and are retried unchanged
                for _ in range(failures + 1):
                    with contextlib.suppress(Exception):
                        proc.flush()
        sink.fail_next = 0
        proc.flush()
        n, dups = len(sent), len(sent) - n_unique
        assert outcome(proc, "consumed") == n
        assert outcome(proc, "duplicate") == dups
        assert outcome(proc, "stored") == n - dups == len(sink.events)
        assert outcome(proc, "poison") == 0
        stored_rows = count(proc, "tally_worker_flush_rows_total", table="events")
        assert stored_rows >= n_unique  # retried attempts write their rows again
        if failures == 0:
            assert count(proc, "tally_worker_store_errors_total") == 0


def test_late_events_flush_rows_and_store_errors(tmp_path: Path) -> None:
    proc, sink, _ = make(tmp_path)
    proc.add(0, 0, payload([("a", ING - 61_000, {}), ("b", ING - 1_000, {}), ("c", T0, {})]))
    sink.fail_next = 1
    with contextlib.suppress(Exception):
        proc.flush()
    assert count(proc, "tally_worker_store_errors_total") == 1
    assert outcome(proc, "stored") == 0  # nothing counts before the commit is verified
    proc.flush()
    assert outcome(proc, "stored") == 3
    assert count(proc, "tally_worker_late_events_total") == 1  # a: 61 s before acceptance
    assert count(proc, "tally_worker_flush_rows_total", table="events") == 6  # written twice
    assert count(proc, "tally_worker_flush_rows_total", table="usage_minute") >= 2
    assert count(proc, "tally_worker_flush_seconds_count") == 2
    proc.add(0, 0, payload([("z", T0, {})]))  # at or below the stored offset: skipped
    assert count(proc, "tally_worker_skipped_messages_total") == 1
