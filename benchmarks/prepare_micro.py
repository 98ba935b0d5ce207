"""Micro-benchmark of the worker's flush path without broker or store: ``BatchProcessor.prepare``
(dedupe against the on-disk index, ledger columns, matching and minute windows) and the index
update of the stored links (``DedupeIndex.record_keys``), flush after flush, on what `tally run` sees
under load.

Run: python -m benchmarks.prepare_micro [flushes] [events_per_flush] [partitions] [--marker] —
nothing asserted. ``--marker``: the meters were activated by a marker of this topic (at offset 0
of every partition), as meters created while `tally run` runs are; without it they predate the
topic. Each flush holds ``events_per_flush`` events over ``partitions`` partitions (default:
`tally run`'s, ``runtime.roles.EMBEDDED_PARTITIONS``; one link each), in envelopes of ~125
events (requests of 1000 events of one tenant, grouped by partition as the API does), 4 tenants
with the benchmark workload's 5 meters each (``benchmarks.workload``: count, sum, max,
unique_count, latest), 1000 Zipf-distributed customers per tenant, 2 % client retries (duplicate
ids), 1 % late events. Printed: CPU seconds of this process per flush (median) for decoding
(``add``), ``prepare`` and the index update, and events per CPU-second of prepare + index. The
process runs with `tally run`'s interpreter settings (``tally.process.tune_process``: the
collector's threshold, the switch interval); with Python's default collector threshold the
decoding took ~2x as long as it does in `tally run`.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.workload import METERS, EventFactory
from runtime.roles import EMBEDDED_PARTITIONS
from schemas.envelope import group_rows
from schemas.meters import Meter
from streams.dedupe import DedupeIndex
from streams.processor import BatchProcessor, Link, MeterCache
from tally.process import tune_process
from tally.settings import get_settings

TENANTS = 4
REQUEST = 1000
T0 = 1_700_000_000_000


def meters(activation_topic: str = "") -> list[Meter]:
    return [
        Meter(
            id=f"m{t}-{spec['slug']}",
            tenant_id=f"tenant-{t}",
            created_at=datetime(2020, 1, 1, tzinfo=UTC),
            activation_topic=activation_topic,
            **spec,
        )
        for t in range(TENANTS)
        for spec in METERS
    ]


class _NoStore:
    """The sink as ``prepare`` sees it on partitions assigned from scratch: never called."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"prepare_micro: the store was called ({name})")


def payloads(flushes: int, per_flush: int, partitions: int) -> list[list[tuple[int, bytes]]]:
    """(partition, envelope payload) of every flush."""
    factory = EventFactory(1, "e", 1000, 1.1, 0.02, 0.01)
    out: list[list[tuple[int, bytes]]] = []
    now = T0
    tenant = 0
    for _ in range(flushes):
        batch: list[tuple[int, bytes]] = []
        for _r in range(max(1, per_flush // REQUEST)):
            events, _new = factory.batch(tenant, REQUEST, now)
            rows = [
                (
                    e["id"],
                    e["type"],
                    e["customer"],
                    now - (hash(e["id"]) % 2000),
                    e["properties"],
                )
                for e in events
            ]
            for env in group_rows(f"tenant-{tenant}", now, rows, partitions):
                batch.append((env.partition, env.payload))
            tenant = (tenant + 1) % TENANTS
            now += 35
        out.append(batch)
    return out


def new_processor(
    directory: Path, all_meters: list[Meter], partitions: int, marker: bool
) -> tuple[BatchProcessor, dict[int, DedupeIndex]]:
    """A processor of topic ``bench`` as `tally run` has it after an assignment from scratch
    (dedupe indexes in ``directory``, opened on first use), and its indexes by partition."""
    indexes: dict[int, DedupeIndex] = {}

    def index_for(p: int) -> DedupeIndex:
        if p not in indexes:
            indexes[p] = DedupeIndex.open(directory, "bench", p)
        return indexes[p]

    proc = BatchProcessor(
        "bench",
        _NoStore(),
        index_for,
        meters=MeterCache(lambda: all_meters, clock_ms=lambda: T0),
        clock_ms=lambda: T0,
    )
    for p in range(partitions):
        proc.assign(p, -1)
        proc.activations.load(p, {m.id: 0 for m in all_meters} if marker else {})
    return proc, indexes


def mark_stored(proc: BatchProcessor, links: list[Link]) -> None:
    """What a verified commit does to ``links`` that the benchmarks need: their kept ids go to
    the dedupe index, and the chain moves past them."""
    for k in links:
        proc.index_for(k.partition).record_keys(k.kept_keys, k.kept_ingested_ms, k.last)
        proc._chain[k.partition] = k.last
        del proc._sealed[k.partition]


def main() -> None:
    tune_process(get_settings())
    marker = "--marker" in sys.argv
    argv = [a for a in sys.argv if a != "--marker"]
    flushes = int(argv[1]) if len(argv) > 1 else 30
    per_flush = int(argv[2]) if len(argv) > 2 else 14_000
    partitions = int(argv[3]) if len(argv) > 3 else EMBEDDED_PARTITIONS
    data = payloads(flushes + 1, per_flush, partitions)
    all_meters = meters("bench" if marker else "")
    with tempfile.TemporaryDirectory() as d:
        proc, indexes = new_processor(Path(d), all_meters, partitions, marker)
        offsets = dict.fromkeys(range(partitions), -1)
        decode_s: list[float] = []
        prepare_s: list[float] = []
        record_s: list[float] = []
        events = 0
        for n, batch in enumerate(data):
            c0 = time.process_time()
            for p, payload in batch:
                offsets[p] += 1
                proc.add(p, offsets[p], payload)
            c1 = time.process_time()
            links = proc.seal()
            proc.prepare(links)
            c2 = time.process_time()
            mark_stored(proc, links)
            c3 = time.process_time()
            if n == 0:
                continue  # warm-up
            events += sum(k.events_in for k in links)
            decode_s.append(c1 - c0)
            prepare_s.append(c2 - c1)
            record_s.append(c3 - c2)
        for idx in indexes.values():
            idx.close()
    per = events / flushes
    med_p, med_r = statistics.median(prepare_s), statistics.median(record_s)
    print(
        f"{flushes} flushes of {per:,.0f} events over {partitions} partitions: CPU per flush (median): decode "
        f"{statistics.median(decode_s) * 1000:.1f} ms, prepare {med_p * 1000:.1f} ms, index "
        f"{med_r * 1000:.1f} ms; prepare + index: {per / (med_p + med_r):,.0f} events per "
        f"CPU-second; total CPU {sum(prepare_s) + sum(record_s):.2f} s (collector threshold "
        f"{gc.get_threshold()[0]}, switch interval {sys.getswitchinterval() * 1000:g} ms)"
    )


if __name__ == "__main__":
    main()
