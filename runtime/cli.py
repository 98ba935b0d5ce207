"""The `tally` command line. Entry point: configures logging, reads settings, dispatches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tally import log as logsetup
from tally.errors import TallyError
from tally.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Tally usage metering")
tenant_app = typer.Typer(no_args_is_help=True, help="Tenants and API keys")
meters_app = typer.Typer(no_args_is_help=True, help="Meters")
app.add_typer(tenant_app, name="tenant")
app.add_typer(meters_app, name="meters")

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory (TALLY_DATA_DIR)")]


def _settings(data_dir: Path | None = None, **overrides: object) -> Settings:
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        settings = get_settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic ValidationError: name the setting
        typer.echo(f"invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc
    logsetup.configure(settings.log_level)
    return settings


def _fail(exc: TallyError) -> None:
    typer.echo(f"error: {exc.message}", err=True)
    raise typer.Exit(1)


@app.command()
def run(
    data_dir: DataDir = None,
    host: Annotated[str | None, typer.Option(help="Bind address")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (0 = any free port)")] = None,
) -> None:
    """Embedded mode: broker, chDB, worker and API in one process."""
    from runtime.roles import run_embedded

    try:
        run_embedded(_settings(data_dir, api_host=host, api_port=port))
    except TallyError as exc:
        _fail(exc)


@app.command()
def api(
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Scale-out HTTP API role (needs TALLY_KAFKA_BOOTSTRAP and TALLY_CLICKHOUSE_URL)."""
    from runtime.roles import run_api

    try:
        run_api(_settings(api_host=host, api_port=port))
    except TallyError as exc:
        _fail(exc)


@app.command()
def worker(data_dir: DataDir = None) -> None:
    """Scale-out stream worker role."""
    from runtime.roles import run_worker

    try:
        run_worker(_settings(data_dir))
    except TallyError as exc:
        _fail(exc)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """Run the benchmark harness (source checkout only): `tally bench --quick`, `--help`."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "__main__.py").is_file():
        typer.echo("tally bench needs a source checkout (benchmarks/ is not installed)", err=True)
        raise typer.Exit(2)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    raise typer.Exit(subprocess.call([sys.executable, "-m", "benchmarks", *ctx.args], env=env))


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Apply ClickHouse migrations."""
    from clickhouse.store import open_store

    try:
        store = open_store(_settings(data_dir))
        applied = store.migrate()
        typer.echo("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    except TallyError as exc:
        _fail(exc)


def _admin_token(token: str | None, settings: Settings) -> str:
    tok = token or settings.admin_token
    if not tok:
        typer.echo(
            "a Tally server holds this data directory: pass --admin-token "
            "(or TALLY_ADMIN_TOKEN) printed at its first start",
            err=True,
        )
        raise typer.Exit(2)
    return tok


@tenant_app.command("create")
def tenant_create(
    name: str,
    data_dir: DataDir = None,
    admin_token: Annotated[str | None, typer.Option(help="Needed when `tally run` is up")] = None,
) -> None:
    """Create a tenant and print its API key (shown once)."""
    from runtime.roles import Core, admin_call, running_server

    settings = _settings(data_dir)
    try:
        url = running_server(settings) if settings.embedded else None
        if url:
            out = admin_call(
                url,
                _admin_token(admin_token, settings),
                "POST",
                "/v1/admin/tenants",
                {"name": name},
            )
            tenant_id, key = out["tenant_id"], out["api_key"]
        else:
            tenant, key = Core.open(settings).repo.create_tenant(name)
            tenant_id = tenant.tenant_id
    except TallyError as exc:
        _fail(exc)
        return
    typer.echo(f"tenant_id: {tenant_id}")
    typer.echo(f"api_key:   {key}   (shown once; only its hash is stored)")


@tenant_app.command("list")
def tenant_list(
    data_dir: DataDir = None,
    admin_token: Annotated[str | None, typer.Option()] = None,
) -> None:
    from runtime.roles import Core, admin_call, running_server

    settings = _settings(data_dir)
    try:
        url = running_server(settings) if settings.embedded else None
        if url:
            rows = admin_call(url, _admin_token(admin_token, settings), "GET", "/v1/admin/tenants")
            items = rows.get("data", rows) if isinstance(rows, dict) else rows
            for t in items:
                typer.echo(f"{t['tenant_id']}\t{t['name']}")
        else:
            for t in Core.open(settings).repo.list_tenants():
                typer.echo(f"{t.tenant_id}\t{t.name}")
    except TallyError as exc:
        _fail(exc)


@meters_app.command("backfill")
def meters_backfill(
    slug: str,
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id")],
    data_dir: DataDir = None,
    admin_token: Annotated[str | None, typer.Option(help="Needed when `tally run` is up")] = None,
) -> None:
    """Apply meter SLUG to the events stored before it existed (safe to re-run)."""
    from runtime.roles import Core, admin_call, running_server

    settings = _settings(data_dir)
    try:
        url = running_server(settings) if settings.embedded else None
        if url:
            typer.echo(f"backfilling {slug} in the running server at {url} ...")
            out = admin_call(
                url,
                _admin_token(admin_token, settings),
                "POST",
                f"/v1/admin/tenants/{tenant}/meters/{slug}/backfill",
            )
            scanned, matched, windows = out["events_scanned"], out["events_matched"], out["windows"]
        else:
            from clickhouse.sink import ClickHouseSink
            from streams.backfill import backfill_meter

            core = Core.open(settings)
            meter = core.repo.get_meter(tenant, slug)
            sink = ClickHouseSink(core.store)
            total = sink.count_events_before(tenant, meter.event_type, meter.created_at)
            with typer.progressbar(length=max(total, 1), label=f"backfill {slug}") as bar:
                res = backfill_meter(sink, meter, progress=bar.update)
            scanned, matched, windows = res.events_scanned, res.events_matched, res.windows
    except TallyError as exc:
        _fail(exc)
        return
    typer.echo(f"done: {scanned} events scanned, {matched} matched, {windows} minute windows")
