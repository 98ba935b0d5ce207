"""What the store's background merges cost per event, on chDB alone (no broker, no API): the
links ``benchmarks.store_micro.prepared_links`` prepares (the harness's workload) written as the
worker writes them (the ledger insert, then the link's commit insert), one link every
``--gap`` seconds, then ``--settle`` seconds for the merges to finish. Printed: the CPU the
process used per kept event (its inserts and every merge of the store's threads), while the
links were written and after, and the active parts and rows of ``events`` and ``usage_minute``
at the end.

Run: python -m benchmarks.merge_micro [links] [events_per_link] [--stop=TABLES] [--base=N]
    [--gap=S] [--settle=S] -- nothing asserted. ``--stop=events``, ``--stop=usage_minute`` or
``--stop=events,usage_minute`` stops those tables' merges first (``SYSTEM STOP MERGES``), so
that the difference to a run without it is what their merges cost; ``--base=N`` sets
``merge_selector_base`` of both tables instead of the migrations' value (10 since migration
080; the store's default is 5). chDB hosts one store per process, so each variant is a run of
its own; compare runs taken in turn (docs/performance.md, "Wider merges of the hot tables").
"""

from __future__ import annotations

import math
import re
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.store_micro import DATABASE, prepared_links
from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store

TABLES = ("events", "usage_minute")
STORE_DEFAULT_BASE = 5  # merge_selector_base of a table that does not set it


def _options(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional arguments and ``--name=value`` options (a flag without ``=`` is refused)."""
    positional: list[str] = []
    options: dict[str, str] = {}
    for arg in argv:
        if arg.startswith("--"):
            name, sep, value = arg[2:].partition("=")
            if not sep or name not in ("stop", "base", "gap", "settle"):
                raise SystemExit(
                    f"merge_micro: unknown option {arg!r} (see the module's docstring)"
                )
            options[name] = value
        else:
            positional.append(arg)
    return positional, options


def _number(name: str, text: str, kind: type[int] | type[float], *, zero_ok: bool = False) -> float:
    """``text`` as a positive (or, with ``zero_ok``, non-negative) finite number, or a worded
    refusal naming ``name``."""
    try:
        value: float | None = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        wanted = "a non-negative" if zero_ok else "a positive"
        raise SystemExit(f"merge_micro: {name} must be {wanted} number (got {text!r})")
    return value


def main(argv: list[str]) -> None:
    positional, options = _options(argv)
    n = int(_number("links", positional[0], int)) if positional else 60
    per_link = (
        int(_number("events_per_link", positional[1], int)) if len(positional) > 1 else 30_000
    )
    stop = [t for t in options.get("stop", "").split(",") if t]
    unknown = [t for t in stop if t not in TABLES]
    if unknown:
        raise SystemExit(f"merge_micro: --stop takes {', '.join(TABLES)} (got {unknown})")
    base = int(_number("--base", options["base"], int)) if "base" in options else None
    gap = _number("--gap", options.get("gap", "0.25"), float, zero_ok=True)
    settle = _number("--settle", options.get("settle", "15"), float, zero_ok=True)
    with tempfile.TemporaryDirectory() as d:
        links = prepared_links(n, per_link, Path(d) / "index")
        store = Store.open(f"chdb://{Path(d) / 'chdb'}", DATABASE)
        try:
            store.migrate()
            if base is not None:
                for table in TABLES:
                    store.command(
                        f"ALTER TABLE {DATABASE}.{table} MODIFY SETTING merge_selector_base = {base}"
                    )
            for table in stop:
                store.command(f"SYSTEM STOP MERGES {DATABASE}.{table}")
            sink = ClickHouseSink(store)
            c0 = time.process_time()
            for k in links:
                sink.insert_events(k.events)
                sink.commit_link("bench", 0, k.first, k.last, k.usage)
                time.sleep(gap)
            c1 = time.process_time()
            time.sleep(settle)
            c2 = time.process_time()
            parts = dict.fromkeys(TABLES, (0, 0))
            for table, count, rows in store.query_rows(
                "SELECT table, count(), sum(rows) FROM system.parts WHERE database = {db:String} "
                "AND active AND table IN ('events', 'usage_minute') GROUP BY table",
                {"db": DATABASE},
            ):
                parts[table] = (int(count), int(rows))
            bases = dict.fromkeys(TABLES, STORE_DEFAULT_BASE)
            for table, ddl in store.query_rows(
                "SELECT name, create_table_query FROM system.tables WHERE database = {db:String} "
                "AND name IN ('events', 'usage_minute')",
                {"db": DATABASE},
            ):
                m = re.search(r"merge_selector_base = (\d+)", ddl)
                if m:
                    bases[table] = int(m.group(1))
        finally:
            store.close()
    events = sum(k.events.num_rows for k in links)
    per = 1e6 / events
    print(
        f"{len(links)} links, {events:,} kept events; merges stopped: {','.join(stop) or 'none'}; "
        f"merge_selector_base: {base if base is not None else 'as migrated'}"
    )
    print(
        f"  CPU per event: {(c1 - c0) * per:.2f} us while written, {(c2 - c1) * per:.2f} us "
        f"after, {(c2 - c0) * per:.2f} us in all"
    )
    for table in TABLES:
        count, rows = parts[table]
        print(f"  {table}: {count} active parts, {rows:,} rows, merge_selector_base {bases[table]}")


if __name__ == "__main__":
    main(sys.argv[1:])
