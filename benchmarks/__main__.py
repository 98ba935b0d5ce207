"""``python -m benchmarks [--quick] [options]`` — see docs/performance.md."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from benchmarks.params import FULL, QUICK
from benchmarks.run import RemoteTarget, Runner
from benchmarks.target import REPO, BenchError

app = typer.Typer(add_completion=False, help=__doc__)


def _volumes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        mult = 1
        if part.endswith("M"):
            mult, part = 1_000_000, part[:-1]
        elif part.endswith("K"):
            mult, part = 1000, part[:-1]
        out.append(int(float(part) * mult))
    return out


@app.command()
def main(
    quick: Annotated[bool, typer.Option(help="Small run (< 2 min): CI checks its output")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default benchmarks/results/<run>)")
    ] = None,
    url: Annotated[
        list[str] | None,
        typer.Option(help="Benchmark a running deployment at this API URL (repeatable)"),
    ] = None,
    key: Annotated[
        list[str] | None, typer.Option(help="Remote: tenant API key to use (repeatable)")
    ] = None,
    admin_token: Annotated[
        str | None, typer.Option(help="Remote: admin token, to create the benchmark tenants")
    ] = None,
    clickhouse_url: Annotated[
        str | None,
        typer.Option(help="Remote: ClickHouse URL, for the store ceiling and written history"),
    ] = None,
    clickhouse_database: Annotated[str, typer.Option(help="Remote: database")] = "tally",
    kafka_bootstrap: Annotated[
        str | None, typer.Option(help="Remote: Kafka bootstrap, for the broker ceilings")
    ] = None,
    partitions: Annotated[int, typer.Option(help="Remote: partitions of the events topic")] = 8,
    pid: Annotated[
        int | None, typer.Option(help="Remote: a local Tally process to sample RSS of and profile")
    ] = None,
    clients: Annotated[int | None, typer.Option(help="Concurrent clients")] = None,
    tenants: Annotated[int | None, typer.Option(help="Tenants (embedded or --admin-token)")] = None,
    volumes: Annotated[
        str | None, typer.Option(help="Stored volumes to reach, e.g. 1M,10M")
    ] = None,
    step_seconds: Annotated[float | None, typer.Option(help="Seconds per load step")] = None,
    wait: Annotated[
        str | None,
        typer.Option(help="Ingest ?wait= for the load: broker or stored (default: the server's)"),
    ] = None,
    profile_seconds: Annotated[
        float | None, typer.Option(help="py-spy profile length (0: no profile)")
    ] = None,
    keep_data: Annotated[bool, typer.Option(help="Keep the embedded data directory")] = False,
    work_dir: Annotated[
        Path | None, typer.Option(help="Where the embedded data directory is created")
    ] = None,
) -> None:
    """Benchmark Tally: ceilings, ingest ramp, latency, freshness, queries, memory, profile."""
    params = dataclasses.replace(QUICK if quick else FULL)
    overrides: dict[str, Any] = {
        "clients": clients,
        "tenants": tenants,
        "volumes": _volumes(volumes) if volumes is not None else None,
        "step_s": step_seconds,
        "wait": wait,
        "profile_s": profile_seconds,
    }
    params = dataclasses.replace(params, **{k: v for k, v in overrides.items() if v is not None})
    remote = None
    if url:
        remote = RemoteTarget(
            urls=[u.rstrip("/") for u in url],
            keys=list(key or []),
            admin_token=admin_token,
            clickhouse_url=clickhouse_url,
            clickhouse_database=clickhouse_database,
            kafka_bootstrap=kafka_bootstrap,
            pid=pid,
            partitions=partitions,
        )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = out or REPO / "benchmarks" / "results" / f"{stamp}{'-quick' if quick else ''}"
    console = Console(stderr=True)
    console.print(f"[bold]Tally benchmark[/] → {out_dir}")
    runner = Runner(params, out_dir, console, remote, keep_data, work_dir, quick=quick)
    try:
        res = runner.run()
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/] {exc}")
        raise typer.Exit(1) from exc
    ing = res["ingest"]
    console.print(
        f"[bold]done[/] in {res['duration_s']:.0f} s: max stored {ing['max_stored_events_per_s']:,.0f} "
        f"events/s ({res['ratios']['stored_max/bottleneck_ceiling']:.1%} of the lowest ceiling); "
        f"results in {out_dir}"
    )
    if not res["count_check_final"]["ok"]:
        console.print("[red]count check failed: stored events differ from acknowledged events[/]")
        raise typer.Exit(3)


if __name__ == "__main__":
    app()
