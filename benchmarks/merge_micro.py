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

import re
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.store_micro import DATABASE, prepared_links
from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store

TABLES = ("events", "usage_minute")
_IN_TABLES = ", ".join(f"'{t}'" for t in TABLES)  # constants: an SQL list of TABLES

app = typer.Typer(add_completion=False, help=__doc__)


def _tables(text: str) -> list[str]:
    """``--stop``: a comma-separated list of TABLES (empty: none)."""
    stop = [t for t in text.split(",") if t]
    unknown = [t for t in stop if t not in TABLES]
    if unknown:
        raise typer.BadParameter(
            f"takes {', '.join(TABLES)} (got {', '.join(unknown)})", param_hint="'--stop'"
        )
    return stop


@app.command()
def main(
    links: Annotated[int, typer.Argument(min=1, help="links written")] = 60,
    per_link: Annotated[int, typer.Argument(min=1, help="events per link")] = 30_000,
    stop_text: Annotated[
        str, typer.Option("--stop", help="tables whose merges are stopped, comma-separated")
    ] = "",
    base: Annotated[
        int | None, typer.Option(min=1, help="merge_selector_base of both tables")
    ] = None,
    gap: Annotated[float, typer.Option(min=0, max=60, help="seconds between links")] = 0.25,
    settle: Annotated[
        float, typer.Option(min=0, max=3600, help="seconds for the merges after")
    ] = 15,
) -> None:
    stop = _tables(stop_text)
    with tempfile.TemporaryDirectory() as d:
        prepared = prepared_links(links, per_link, Path(d) / "index")
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
            for k in prepared:
                sink.insert_events(k.events)
                sink.commit_link("bench", 0, k.first, k.last, k.usage)
                time.sleep(gap)
            c1 = time.process_time()
            time.sleep(settle)
            c2 = time.process_time()
            parts = dict.fromkeys(TABLES, (0, 0))
            for table, count, rows in store.query_rows(
                "SELECT table, count(), sum(rows) FROM system.parts WHERE database = {db:String} "
                f"AND active AND table IN ({_IN_TABLES}) GROUP BY table",
                {"db": DATABASE},
            ):
                parts[table] = (int(count), int(rows))
            default = store.query_rows(
                "SELECT value FROM system.merge_tree_settings WHERE name = 'merge_selector_base'"
            )
            bases = dict.fromkeys(TABLES, int(default[0][0]))  # a table that does not set it
            for table, ddl in store.query_rows(
                "SELECT name, create_table_query FROM system.tables WHERE database = {db:String} "
                f"AND name IN ({_IN_TABLES})",
                {"db": DATABASE},
            ):
                m = re.search(r"merge_selector_base = (\d+)", ddl)
                if m:
                    bases[table] = int(m.group(1))
        finally:
            store.close()
    events = sum(k.events.num_rows for k in prepared)
    per = 1e6 / events
    print(
        f"{len(prepared)} links, {events:,} kept events; merges stopped: {','.join(stop) or 'none'}; "
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
    app()
