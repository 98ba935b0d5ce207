"""The worker's dedupe index alone: ids recorded per link (``add_many``, one transaction per link)
against batched writes (``record_keys``, the worker's columns), on random event ids (UUIDs) and
a growing index.

Run: python -m benchmarks.dedupe_index [ids] [link_size] — nothing asserted. For every link the
worker's pattern is replayed: ``contains_many`` of the link's ids, then their insert. Printed:
ids per CPU-second of this process over the second half of the run (the index then holds
ids/2 .. ids entries), for each way, one after the other, each on a fresh index file.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

from streams.dedupe import DedupeIndex


def run(directory: Path, ids: int, link: int, batched: bool) -> float:
    idx = DedupeIndex.open(directory, "bench", 0)
    tenant = str(uuid.uuid4())
    cpu = 0.0
    done = 0
    offset = 0
    while done < ids:
        # the worker's columns: (tenant, id) keys and their ingestion times
        keys = [(tenant, str(uuid.uuid4())) for _ in range(link)]
        ingested = [1_700_000_000_000] * link
        rows = [(t, e, ms) for (t, e), ms in zip(keys, ingested, strict=True)]
        t0 = time.process_time()
        idx.contains_many(keys)
        offset += 1
        if batched:
            idx.record_keys(keys, ingested, offset)
        else:
            idx.add_many(rows, offset)
        if done >= ids // 2:
            cpu += time.process_time() - t0
        done += link
    t0 = time.process_time()
    idx.close()  # writes what is still held
    cpu += time.process_time() - t0
    return (ids - ids // 2) / cpu


def main() -> None:
    ids = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    link = int(sys.argv[2]) if len(sys.argv) > 2 else 12_000
    for batched in (False, True):
        with tempfile.TemporaryDirectory() as d:
            rate = run(Path(d), ids, link, batched)
        way = "record (batched)" if batched else "add_many per link"
        print(f"{way:18s} ids={ids} link={link}: {rate:,.0f} ids per CPU-second")


if __name__ == "__main__":
    main()
