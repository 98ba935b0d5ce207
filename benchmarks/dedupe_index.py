"""The worker's dedupe index alone: ids recorded per link (``add_many``, one transaction per link)
against batched writes (``record_keys``, the worker's columns), with and without the in-memory
id filter (``streams.idfilter``), on random event ids (UUIDs) and a growing index.

Run: python -m benchmarks.dedupe_index [ids] [link_size] — nothing asserted. For every link the
worker's pattern is replayed: ``contains_many`` of the link's ids, then their insert. Printed:
ids per CPU-second of this process over the second half of the run (the index then holds
ids/2 .. ids entries), split into lookups and writes, and the longest single write call (what
one flush waits for it), for each way, one after the other, each on a fresh index file. The
CPU of the index's background threads (write behind, filter builds) counts in the phase that
runs meanwhile; the total per id is right. With the filter, lookups are so cheap that the loop
outruns the background writer: its longest write call is then a wait for a write or move in
flight (back-pressure), which the worker's ingest rate does not reach.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from streams.dedupe import FILTER_MAX_BYTES, DedupeIndex


class Cost(NamedTuple):
    """Over the second half of a run: CPU per id of the lookups and of the writes, and the
    longest single write call (wall: what one flush waits)."""

    lookup_us: float
    write_us: float
    longest_write_ms: float

    @property
    def ids_per_cpu_s(self) -> float:
        return 1e6 / (self.lookup_us + self.write_us)


def run(directory: Path, ids: int, link: int, batched: bool, filter_bytes: int) -> Cost:
    idx = DedupeIndex.open(directory, "bench", 0, filter_max_bytes=filter_bytes)
    tenant = str(uuid.uuid4())
    lookup = write = longest = 0.0
    done = 0
    offset = 0
    while done < ids:
        # the worker's columns: (tenant, id) keys and their ingestion times
        keys = [(tenant, str(uuid.uuid4())) for _ in range(link)]
        ingested = [1_700_000_000_000] * link
        rows = [(t, e, ms) for (t, e), ms in zip(keys, ingested, strict=True)]
        t0 = time.process_time()
        idx.contains_many(keys)
        t1, w1 = time.process_time(), time.perf_counter()
        offset += 1
        if batched:
            idx.record_keys(keys, ingested, offset)
        else:
            idx.add_many(rows, offset)
        if done >= ids // 2:
            lookup += t1 - t0
            write += time.process_time() - t1
            longest = max(longest, time.perf_counter() - w1)
        done += link
    t0 = time.process_time()
    idx.close()  # writes what is still held
    write += time.process_time() - t0
    half = ids - ids // 2
    return Cost(lookup / half * 1e6, write / half * 1e6, longest * 1000)


def main() -> None:
    ids = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    link = int(sys.argv[2]) if len(sys.argv) > 2 else 12_000
    ways = [
        ("add_many per link", False, FILTER_MAX_BYTES),
        ("record, no filter", True, 0),
        ("record (batched)", True, FILTER_MAX_BYTES),
    ]
    for way, batched, filter_bytes in ways:
        with tempfile.TemporaryDirectory() as d:
            cost = run(Path(d), ids, link, batched, filter_bytes)
        print(
            f"{way:18s} ids={ids} link={link}: {cost.ids_per_cpu_s:,.0f} ids per CPU-second "
            f"(lookups {cost.lookup_us:.2f} us/id, writes {cost.write_us:.2f} us/id, longest "
            f"write {cost.longest_write_ms:.0f} ms)"
        )


if __name__ == "__main__":
    main()
