"""Micro-benchmark of the store's calls in one worker flush, on chDB alone (no broker, no API):
the ledger insert (``ClickHouseSink.insert_events``), the link's commit insert (``commit_link``:
usage rows, their day rows and the progress row) and the read of progress and claims after it
(``read_chain``: a full read, and the worker's read after a commit, which reads only the parts
written since the read before it), link after link, on the links ``benchmarks.prepare_micro`` prepares (the
harness's workload: 4 tenants, 5 meters, 1000 Zipf customers, 2 % retries, 1 % late events).

Run: python -m benchmarks.store_micro [links] [events_per_link] [--stop-merges] -- nothing
asserted. Printed for each call: wall-clock ms (median, p90) and the CPU the process used during
it (median ms, all its threads: the store's own threads included, and its background merges
unless ``--stop-merges``, which stops the merges of the benchmark's database first so that the
CPU is the calls' own; the active parts then grow link by link). The ledger insert is timed
twice: with the worker's settings (``EVENTS_INSERT_SETTINGS``: rows of one key not combined at
insert) and with the store's defaults (the combining pass), the two taking turns link by link
into two tables of the same definition, so that both meet the same merges.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.prepare_micro import mark_stored, meters, new_processor, payloads
from clickhouse.rollup import with_day_rows
from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store
from streams.processor import Link

DATABASE = "bench"


def prepared_links(n: int, per_link: int, directory: Path) -> list[Link]:
    """``n`` prepared links of ~``per_link`` events each, of one partition, in chain order."""
    proc, indexes = new_processor(directory, meters(""), 1, False)
    out: list[Link] = []
    offset = -1
    for batch in payloads(n, per_link, 1):
        for p, payload in batch:
            offset += 1
            proc.add(p, offset, payload)
        links = proc.seal()
        proc.prepare(links)
        mark_stored(proc, links)
        out.extend(links)
    for idx in indexes.values():
        idx.close()
    return out


def _ms(values: list[float], q: float) -> str:
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


def main(argv: list[str]) -> None:
    stop_merges = "--stop-merges" in argv
    argv = [a for a in argv if a != "--stop-merges"]
    n = int(argv[0]) if argv else 40
    per_link = int(argv[1]) if len(argv) > 1 else 9_000
    with tempfile.TemporaryDirectory() as d:
        links = prepared_links(n, per_link, Path(d) / "index")
        store = Store.open(f"chdb://{Path(d) / 'chdb'}", DATABASE)
        try:
            store.migrate()  # Store.open created the database
            store.command(f"CREATE TABLE {DATABASE}.events_default AS {DATABASE}.events")
            if stop_merges:
                for table in ("events", "events_default", "usage_minute"):
                    store.command(f"SYSTEM STOP MERGES {DATABASE}.{table}")
            sink = ClickHouseSink(store)
            times: dict[str, list[float]] = {}
            cpu: dict[str, list[float]] = {}
            active: list[int] = []  # active parts of usage_minute after each link

            def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
                c0, t0 = time.process_time(), time.perf_counter()
                out = fn(*args)
                times.setdefault(name, []).append(time.perf_counter() - t0)
                cpu.setdefault(name, []).append(time.process_time() - c0)
                return out

            before = sink.read_chain("bench", [0])

            for i, k in enumerate(links):
                timed("ledger insert (worker's settings)", sink.insert_events, k.events)
                timed(
                    "ledger insert (store defaults)", store.insert_arrow, "events_default", k.events
                )
                timed("commit insert", sink.commit_link, "bench", 0, k.first, k.last, k.usage)
                # the two reads take turns going first (the first one warms the store's caches)
                if i % 2:
                    timed("read of progress and claims (full)", sink.read_chain, "bench", [0])
                before = timed(
                    "read of progress and claims (since the link's read before)",
                    sink.read_chain,
                    "bench",
                    [0],
                    before,
                )
                if not i % 2:
                    timed("read of progress and claims (full)", sink.read_chain, "bench", [0])
                parts = store.query_rows(
                    "SELECT count() FROM system.parts WHERE database = {db:String} "
                    "AND table = 'usage_minute' AND active",
                    {"db": DATABASE},
                )
                active.append(int(parts[0][0]))
        finally:
            store.close()
    usage_rows = statistics.median(with_day_rows(k.usage).num_rows for k in links)
    events = statistics.median(k.events.num_rows for k in links)
    merges = "stopped" if stop_merges else "running"
    print(
        f"{len(links)} links of {events:,.0f} kept events ({usage_rows:,.0f} usage rows with "
        f"their day rows), merges {merges}; per call: wall ms median / p90, CPU ms median:"
    )
    for name, values in times.items():
        wall = f"{_ms(values, 0.5)} / {_ms(values, 0.9)}"
        print(f"  {name}: {wall} ms wall, {_ms(cpu[name], 0.5)} ms CPU")
    print(
        f"  active parts of usage_minute after a link: median {statistics.median(active):.0f}, max {max(active)}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
