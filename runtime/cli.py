"""The `tally` command line. Entry point: configures logging, reads settings, dispatches."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from tally import log as logsetup
from tally.errors import TallyError
from tally.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Tally usage metering")
tenant_app = typer.Typer(no_args_is_help=True, help="Tenants")
keys_app = typer.Typer(no_args_is_help=True, help="API keys of a tenant")
tokens_app = typer.Typer(no_args_is_help=True, help="Admin tokens")
limits_app = typer.Typer(no_args_is_help=True, help="Per-tenant rate limits and quota")
meters_app = typer.Typer(no_args_is_help=True, help="Meters")
invoices_app = typer.Typer(no_args_is_help=True, help="Invoices")
events_app = typer.Typer(no_args_is_help=True, help="Events")
app.add_typer(tenant_app, name="tenant")
app.add_typer(keys_app, name="keys")
app.add_typer(tokens_app, name="admin-tokens")
app.add_typer(limits_app, name="limits")
app.add_typer(meters_app, name="meters")
app.add_typer(invoices_app, name="invoices")
app.add_typer(events_app, name="events")

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory (TALLY_DATA_DIR)")]


def _settings(data_dir: Path | None = None, **overrides: object) -> Settings:
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        settings = get_settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic ValidationError: name the setting
        typer.echo(f"invalid settings: {exc}", err=True)
        raise typer.Exit(2) from exc
    logsetup.configure(settings.log_level, settings.log_format.value)
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
    """Embedded mode: broker, chDB, worker and API on this machine (TALLY_EMBEDDED_PROCESSES)."""
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


AdminToken = Annotated[
    str | None, typer.Option(help="Needed when `tally run` is up (or TALLY_ADMIN_TOKEN)")
]
Tenant = Annotated[str, typer.Option("--tenant", help="Tenant id")]


def _admin(
    data_dir: Path | None,
    admin_token: str | None,
    via_api: Callable[[Any], Any],
    direct: Callable[[Any], Any],
) -> Any:
    """Run an admin operation through a running `tally run` (admin API) or on the store.

    ``via_api(call)`` gets ``call(method, path, body=None) -> json``; ``direct(core)`` gets an
    opened ``runtime.roles.Core``. Both return the same JSON-shaped answer.
    """
    from runtime.roles import Core, admin_call, running_server

    settings = _settings(data_dir)
    try:
        url = running_server(settings) if settings.embedded else None
        if url:
            token = _admin_token(admin_token, settings)
            return via_api(
                lambda method, path, body=None: admin_call(url, token, method, path, body)
            )
        return direct(Core.open(settings))
    except TallyError as exc:
        _fail(exc)


def _show_key(k: dict[str, Any]) -> None:
    typer.echo(
        f"{k['id']}\t{k['status']}\t{k['name'] or '-'}\t{k['prefix']}...\t"
        f"created {k['created_at']}\texpires {k['expires_at'] or 'never'}\t"
        f"last used {k['last_used_at'] or 'never'}"
    )


@keys_app.command("create")
def keys_create(
    tenant: Tenant,
    name: Annotated[str | None, typer.Option(help="A label, e.g. 'ci'")] = None,
    expires_at: Annotated[
        str | None, typer.Option(help="RFC 3339, e.g. 2027-01-01T00:00:00Z")
    ] = None,
    data_dir: DataDir = None,
    admin_token: AdminToken = None,
) -> None:
    """Create an API key for a tenant and print it (shown once)."""
    body: dict[str, Any] = {"name": name, "expires_at": expires_at}

    def direct(core: Any) -> Any:
        from schemas.credentials import KeyIn
        from schemas.timeutil import utc_now

        core.repo.get_tenant(tenant)
        req = _model(KeyIn, body)
        info, key = core.repo.credentials.create_api_key(tenant, req.name, req.expires_at)
        return {**info.to_json(utc_now()), "api_key": key}

    out = _admin(
        data_dir,
        admin_token,
        lambda call: call("POST", f"/v1/admin/tenants/{tenant}/keys", body),
        direct,
    )
    _show_key(out)
    typer.echo(f"api_key: {out['api_key']}   (shown once; only its hash is stored)")


@keys_app.command("list")
def keys_list(tenant: Tenant, data_dir: DataDir = None, admin_token: AdminToken = None) -> None:
    """List a tenant's keys (never the secrets): id, status, name, prefix, times."""

    def direct(core: Any) -> Any:
        from schemas.timeutil import utc_now

        core.repo.get_tenant(tenant)
        now = utc_now()
        return {"data": [k.to_json(now) for k in core.repo.credentials.list_api_keys(tenant)]}

    out = _admin(
        data_dir, admin_token, lambda call: call("GET", f"/v1/admin/tenants/{tenant}/keys"), direct
    )
    for k in out["data"]:
        _show_key(k)


@keys_app.command("revoke")
def keys_revoke(
    key_id: str, tenant: Tenant, data_dir: DataDir = None, admin_token: AdminToken = None
) -> None:
    """Revoke a key (effective within auth_positive_ttl_s in every API process)."""

    def direct(core: Any) -> Any:
        from schemas.timeutil import utc_now

        return core.repo.credentials.revoke_api_key(tenant, key_id).to_json(utc_now())

    out = _admin(
        data_dir,
        admin_token,
        lambda call: call("DELETE", f"/v1/admin/tenants/{tenant}/keys/{key_id}"),
        direct,
    )
    _show_key(out)


@keys_app.command("rotate")
def keys_rotate(
    key_id: str,
    tenant: Tenant,
    overlap: Annotated[int, typer.Option(help="Seconds the old key keeps working")] = 3600,
    data_dir: DataDir = None,
    admin_token: AdminToken = None,
) -> None:
    """Replace a key: prints the new key; the old one works for --overlap more seconds."""
    body = {"overlap_s": overlap}

    def direct(core: Any) -> Any:
        from schemas.credentials import RotateIn
        from schemas.timeutil import utc_now

        req = _model(RotateIn, body)
        new, secret, old = core.repo.credentials.rotate_api_key(
            tenant, key_id, timedelta(seconds=req.overlap_s)
        )
        now = utc_now()
        return {**new.to_json(now), "api_key": secret, "previous": old.to_json(now)}

    out = _admin(
        data_dir,
        admin_token,
        lambda call: call("POST", f"/v1/admin/tenants/{tenant}/keys/{key_id}/rotate", body),
        direct,
    )
    _show_key(out["previous"])
    _show_key(out)
    typer.echo(f"api_key: {out['api_key']}   (shown once; only its hash is stored)")


def _model(model: Any, body: dict[str, Any]) -> Any:
    import pydantic

    from tally.errors import ValidationError

    try:
        return model.model_validate({k: v for k, v in body.items() if v is not None})
    except pydantic.ValidationError as exc:
        raise ValidationError.from_pydantic(exc, "invalid option") from None


def _show_token(t: dict[str, Any]) -> None:
    typer.echo(
        f"{t['id']}\t{t['status']}\t{t['name'] or '-'}\tcreated {t['created_at']}"
        + (f"\trevoked {t['revoked_at']}" if t.get("revoked_at") else "")
    )


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str | None, typer.Option(help="A label")] = None,
    data_dir: DataDir = None,
    admin_token: AdminToken = None,
) -> None:
    """Create an admin token and print it (shown once)."""

    def direct(core: Any) -> Any:
        info, token = core.repo.credentials.create_admin_token(name)
        return {**info.to_json(), "admin_token": token}

    out = _admin(
        data_dir, admin_token, lambda call: call("POST", "/v1/admin/tokens", {"name": name}), direct
    )
    _show_token(out)
    typer.echo(f"admin_token: {out['admin_token']}   (shown once; only its hash is stored)")


@tokens_app.command("list")
def tokens_list(data_dir: DataDir = None, admin_token: AdminToken = None) -> None:
    def direct(core: Any) -> Any:
        return {"data": [t.to_json() for t in core.repo.credentials.list_admin_tokens()]}

    out = _admin(data_dir, admin_token, lambda call: call("GET", "/v1/admin/tokens"), direct)
    for t in out["data"]:
        _show_token(t)


@tokens_app.command("revoke")
def tokens_revoke(token_id: str, data_dir: DataDir = None, admin_token: AdminToken = None) -> None:
    """Revoke an admin token (effective within auth_positive_ttl_s in every API process)."""

    def direct(core: Any) -> Any:
        return core.repo.credentials.revoke_admin_token(token_id).to_json()

    out = _admin(
        data_dir, admin_token, lambda call: call("DELETE", f"/v1/admin/tokens/{token_id}"), direct
    )
    _show_token(out)


def _show_limits(out: dict[str, Any]) -> None:
    for name, value in out["effective"].items():
        override = out["overrides"].get(name)
        src = "default" if override is None else "override"
        shown = "unlimited" if value == 0 else f"{value:g}" if isinstance(value, float) else value
        typer.echo(f"{name}\t{shown}\t({src})")


@limits_app.command("show")
def limits_show(tenant: Tenant, data_dir: DataDir = None, admin_token: AdminToken = None) -> None:
    """The limits in effect for a tenant (0 = unlimited) and where they come from."""

    def direct(core: Any) -> Any:
        from api.limits import effective_limits
        from clickhouse.limits import LimitsRepo

        core.repo.get_tenant(tenant)
        o = LimitsRepo(core.store).get(tenant)
        eff = effective_limits(_settings(data_dir), o)
        return {"overrides": o.to_json(), "effective": eff.to_json()}

    _show_limits(
        _admin(
            data_dir,
            admin_token,
            lambda call: call("GET", f"/v1/admin/tenants/{tenant}/limits"),
            direct,
        )
    )


@limits_app.command("set")
def limits_set(
    tenant: Tenant,
    requests_per_second: Annotated[float | None, typer.Option()] = None,
    events_per_second: Annotated[float | None, typer.Option()] = None,
    max_batch_events: Annotated[int | None, typer.Option()] = None,
    monthly_events: Annotated[int | None, typer.Option()] = None,
    data_dir: DataDir = None,
    admin_token: AdminToken = None,
) -> None:
    """Replace a tenant's overrides (omitted = default, 0 = unlimited)."""
    body: dict[str, Any] = {
        "requests_per_second": requests_per_second,
        "events_per_second": events_per_second,
        "max_batch_events": max_batch_events,
        "monthly_events": monthly_events,
    }

    def direct(core: Any) -> Any:
        from api.limits import effective_limits
        from clickhouse.limits import LimitOverrides, LimitsRepo
        from schemas.credentials import LimitsIn

        core.repo.get_tenant(tenant)
        req = _model(LimitsIn, body)
        o = LimitOverrides(**req.model_dump())
        LimitsRepo(core.store).put(tenant, o)
        eff = effective_limits(_settings(data_dir), o)
        return {"overrides": o.to_json(), "effective": eff.to_json()}

    _show_limits(
        _admin(
            data_dir,
            admin_token,
            lambda call: call("PUT", f"/v1/admin/tenants/{tenant}/limits", body),
            direct,
        )
    )


@meters_app.command("backfill")
def meters_backfill(
    slug: str,
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id")],
    data_dir: DataDir = None,
    admin_token: Annotated[str | None, typer.Option(help="Needed when `tally run` is up")] = None,
) -> None:
    """Count meter SLUG's history: the events from before its activation markers.

    Exclusive per meter (a second run fails with the running run's id), resumable (a run whose
    process died is resumed from its last checkpoint by the next invocation) and atomic (queries
    show the previous run until this one is complete).
    """
    from runtime.roles import admin_call, running_server

    settings = _settings(data_dir)
    try:
        url = running_server(settings) if settings.embedded else None
        if url:
            token = _admin_token(admin_token, settings)
            path = f"/v1/admin/tenants/{tenant}/meters/{slug}/backfill"
            typer.echo(f"backfilling {slug} in the running server at {url} ...", err=True)
            with _BackfillBar(slug) as bar:
                out = _remote_backfill(url, token, path, bar, admin_call)
        else:
            out = _local_backfill(settings, tenant, slug)
    except TallyError as exc:
        _fail(exc)
        return
    if out["state"] == "nothing_to_backfill":
        typer.echo(
            f"nothing to backfill: meter {slug} was stored without activation markers, so the "
            "stream applies it to every event"
        )
        return
    how = "resumed" if out["resumed"] else "new"
    typer.echo(
        f"done: run {out['run_id']} ({how}): {out['events_scanned']} events scanned, "
        f"{out['events_matched']} matched, {out['windows']} minute windows"
    )


class _BackfillBar:
    """A rich progress bar on stderr: partitions while waiting for the worker, then events."""

    def __init__(self, slug: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.slug = slug
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self.task = self.progress.add_task(f"backfill {slug}", total=None)

    def __enter__(self) -> _BackfillBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, phase: str, done: int, total: int, run_id: str = "") -> None:
        if phase == "waiting":
            desc = f"{self.slug}: waiting for the worker to pass the markers (partitions)"
        else:
            desc = f"{self.slug}: run {run_id} (events)" if run_id else f"{self.slug} (events)"
        self.progress.update(self.task, description=desc, completed=done, total=max(total, done))


def _local_backfill(settings: Settings, tenant: str, slug: str) -> dict[str, object]:
    from dataclasses import asdict

    from clickhouse.backfill import BackfillStore
    from runtime.roles import Core
    from streams.backfill import BackfillRunner, LiveTopic, Progress

    core = Core.open(settings)
    meter = core.repo.get_meter(tenant, slug)
    live = None
    if not settings.embedded:  # scale-out: the worker consumes events_topic now
        from api.topics import topic_partitions

        try:
            parts = topic_partitions(settings.kafka_bootstrap, settings.events_topic)
        except Exception as exc:
            raise TallyError(
                f"cannot read the partitions of {settings.events_topic} from the broker at "
                f"{settings.kafka_bootstrap}: {exc}"
            ) from None
        live = LiveTopic(settings.events_topic, parts)
    with _BackfillBar(slug) as bar:

        def report(p: Progress) -> None:
            bar.update(p.phase, p.done, p.total, p.run_id)

        result = BackfillRunner(
            BackfillStore(core.store),
            meter,
            live=live,
            chunk_events=settings.backfill_chunk_events,
            lease_s=settings.backfill_lease_s,
            wait_s=settings.backfill_wait_s,
            on_progress=report,
        ).run()
    return asdict(result)


def _remote_backfill(
    url: str, token: str, path: str, bar: _BackfillBar, admin_call: Any
) -> dict[str, Any]:
    """POST the backfill to the running server; show its progress from GET meanwhile."""
    import threading

    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["out"] = admin_call(url, token, "POST", path, timeout=None)
        except BaseException as exc:
            box["error"] = exc

    th = threading.Thread(target=call, daemon=True)
    th.start()
    while th.is_alive():
        th.join(0.5)
        try:
            runs = admin_call(url, token, "GET", path).get("data", [])
        except Exception:  # progress only; the POST's answer decides
            runs = []
        active = [r for r in runs if r["state"] == "running"]
        if active:
            r = active[-1]
            bar.update("scanning", r["events_scanned"], r["events_total"], r["run_id"])
    if "error" in box:
        raise box["error"]
    out: dict[str, Any] = box["out"]
    return out


@invoices_app.command("run")
def invoices_run(
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="Close periods that ended (plus grace) by then (RFC 3339)"),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="One tenant id (default: every tenant)")
    ] = None,
    data_dir: DataDir = None,
    admin_token: Annotated[str | None, typer.Option(help="Needed when `tally run` is up")] = None,
) -> None:
    """Create the invoices of every period that closed by --as-of (default now). Idempotent:
    running it again creates nothing twice."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from runtime.roles import Core, admin_call, running_server
    from schemas.timeutil import parse_time

    settings = _settings(data_dir)
    try:
        when = parse_time(as_of) if as_of else None
    except ValueError as exc:
        typer.echo(f"error: --as-of: {exc}", err=True)
        raise typer.Exit(2) from exc
    body = {"as_of": when.isoformat()} if when else {}
    try:
        url = running_server(settings) if settings.embedded else None
        if url:
            token = _admin_token(admin_token, settings)
            tenants = (
                [tenant]
                if tenant
                else [
                    t["tenant_id"]
                    for t in _items(admin_call(url, token, "GET", "/v1/admin/tenants"))
                ]
            )
            with Progress(
                TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()
            ) as bar:
                task = bar.add_task(f"invoice run via {url}", total=len(tenants))
                for tid in tenants:
                    out = admin_call(
                        url, token, "POST", f"/v1/admin/tenants/{tid}/invoices/run", body
                    )
                    bar.advance(task)
                    bar.console.print(_summary_line(tid, out))
            return
        from api.billing_state import build_services

        core = Core.open(settings)
        services = build_services(settings, core.store, core.repo)
        tenants = [tenant] if tenant else [t.tenant_id for t in core.repo.list_tenants()]
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} invoices"),
            TimeElapsedColumn(),
        ) as bar:
            for tid in tenants:
                task = bar.add_task(f"tenant {tid}", total=None)

                def step(
                    stage: str, done: int, total: int, task: Any = task, tid: str = tid
                ) -> None:
                    bar.update(
                        task,
                        total=max(total, 1),
                        completed=done,
                        description=f"tenant {tid}: {stage}",
                    )

                out = services.invoicing.run(tid, when, actor="cli", progress=step)
                bar.console.print(_summary_line(tid, out.model_dump()))
    except TallyError as exc:
        _fail(exc)


def _items(rows: Any) -> list[Any]:
    return list(rows.get("data", rows) if isinstance(rows, dict) else rows)


def _summary_line(tenant_id: str, out: dict[str, Any]) -> str:
    extra = ""
    if out.get("finalized"):
        extra += f", {len(out['finalized'])} finalized"
    if out.get("credit_notes"):
        extra += f", {len(out['credit_notes'])} credit notes"
    return f"{tenant_id}: {len(out['created'])} created, {out['existing']} existing{extra}"


# --- client commands ---------------------------------------------------------------------------

Url = Annotated[
    str | None,
    typer.Option(help="Tally server URL (TALLY_URL; default: the `tally run` of --data-dir)"),
]
ApiKey = Annotated[str | None, typer.Option(help="Tenant API key (TALLY_API_KEY)")]


def _server_url(url: str | None, settings: Settings) -> str | None:
    from runtime.roles import running_server

    return url or settings.url or (running_server(settings) if settings.embedded else None)


@events_app.command("send")
def events_send(
    file: Annotated[Path, typer.Argument(help="NDJSON (.ndjson/.jsonl), JSON array or CSV")],
    url: Url = None,
    api_key: ApiKey = None,
    fmt: Annotated[
        str | None, typer.Option("--format", help="ndjson, json or csv (default: by suffix)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=1000, help="Events per request")] = 1000,
    concurrency: Annotated[int, typer.Option(min=1, max=32, help="Requests in flight")] = 4,
    wait: Annotated[
        str | None, typer.Option(help="broker or stored (default: the server's)")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint file (default: FILE.tally-checkpoint.json)")
    ] = None,
    rejects: Annotated[
        Path | None,
        typer.Option(help="Where rejected records go (default: FILE.rejected.ndjson)"),
    ] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Ignore the checkpoint and send from the start")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Send the events of FILE (bulk loads, history from another system). Resumable: rerun
    the same command after Ctrl-C or a crash and it continues; resending is safe because an
    event's id (given, or derived from its content) is deduplicated by Tally."""
    from runtime.send import CheckpointLock, Format, default_checkpoint, default_rejects

    settings = _settings(data_dir)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    server = _server_url(url, settings)
    key = api_key or settings.api_key.get_secret_value()
    if not server:
        typer.echo("no Tally server: pass --url (or TALLY_URL), or start `tally run`", err=True)
        raise typer.Exit(2)
    if not key:
        typer.echo("no API key: pass --api-key (or TALLY_API_KEY)", err=True)
        raise typer.Exit(2)
    if not file.is_file():
        typer.echo(f"{file}: no such file", err=True)
        raise typer.Exit(2)
    try:
        form = Format.of(file, fmt)
    except ValueError:
        typer.echo(f"--format must be ndjson, json or csv, got {fmt!r}", err=True)
        raise typer.Exit(2) from None
    if wait not in (None, "broker", "stored"):
        typer.echo(f"--wait must be broker or stored, got {wait!r}", err=True)
        raise typer.Exit(2)
    cp_path = checkpoint or default_checkpoint(file)
    rj_path = rejects or default_rejects(file)
    lock = CheckpointLock(cp_path)
    if not lock.acquire():
        typer.echo(
            f"another `tally events send` is running on {file} ({lock.path}); wait for it "
            "or stop it first",
            err=True,
        )
        raise typer.Exit(2)
    try:
        _send_file(file, form, server, key, cp_path, rj_path, restart, batch_size,
                   concurrency, wait)  # fmt: skip
    finally:
        lock.release()


def _send_file(
    file: Path,
    form: Any,
    server: str,
    key: str,
    cp_path: Path,
    rj_path: Path,
    restart: bool,
    batch_size: int,
    concurrency: int,
    wait: str | None,
) -> None:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from runtime.send import (
        FINGERPRINT_BYTES,
        Checkpoint,
        Format,
        Sender,
        SendStats,
        fingerprint,
    )
    from tally_client import Tally, TallyClientError

    console = Console(stderr=True, soft_wrap=True)
    size = file.stat().st_size
    print_ = console.print
    try:
        cp = None if restart else Checkpoint.load(cp_path)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if cp is not None and (
        cp.fingerprint != fingerprint(file, cp.fingerprint_bytes)
        or cp.format != form.value
        or cp.offset > size
    ):
        typer.echo(
            f"the checkpoint {cp_path} belongs to another version of {file} (its first bytes "
            "or its size changed). Use --restart to send the file from the start: events "
            "already sent count once, because their ids are deduplicated",
            err=True,
        )
        raise typer.Exit(2)
    if cp is not None and cp.done and (form is Format.JSON or cp.offset >= size):
        print_(
            f"{file} was sent completely already ({cp.accepted} accepted, {cp.rejected} "
            f"rejected; {cp_path}). Use --restart to send it again."
        )
        return
    if cp is None:
        n = min(size, FINGERPRINT_BYTES)
        cp = Checkpoint(str(file.resolve()), form.value, fingerprint(file, n), n)
    elif cp.records:
        print_(f"resuming after record {cp.records} ({cp.accepted} events sent before)")
    cp.done = False
    if form is Format.JSON:
        import orjson

        doc = orjson.loads(file.read_bytes()) if size else []
        total, unit = (len(doc) if isinstance(doc, list) else 1), "records"
        start = cp.records
    else:
        total, unit, start = size, "bytes", cp.offset
    client = Tally(server, key, max_batch=batch_size)
    columns = [
        TextColumn("[bold]sending[/] {task.fields[name]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[sent]} events sent, {task.fields[bad]} rejected"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if unit == "records":
        columns.insert(3, MofNCompleteColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("send", total=total or 1, completed=start, name=file.name,
                                 sent=0, bad=0)  # fmt: skip

        def show(st: SendStats) -> None:
            done = st.resumed_from + st.records if unit == "records" else st.bytes_done
            progress.update(task, completed=done, sent=st.sent, bad=st.rejected)

        sender = Sender(client, file, form, cp_path, rj_path, batch_size=batch_size,
                        concurrency=concurrency, wait=wait, on_progress=show)  # fmt: skip
        previous = signal.signal(signal.SIGTERM, _interrupt)  # kill: stop like Ctrl-C
        try:
            cp = sender.run(cp)
        except KeyboardInterrupt:
            progress.stop()
            print_(
                f"interrupted: {sender.stats.sent} events sent in this run, position saved in "
                f"{cp_path}. Rerun the same command to continue."
            )
            raise typer.Exit(130) from None
        except (TallyClientError, ValueError, OSError) as exc:
            progress.stop()
            print_(f"[red]stopped:[/] {exc}")
            print_(f"position saved in {cp_path}; rerun the same command to continue.")
            raise typer.Exit(3) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            with contextlib.suppress(TallyClientError):
                client.close()
        progress.update(task, completed=total or 1)
    st = sender.stats
    typer.echo(f"done: {st.sent} events accepted, {st.rejected} rejected in this run "
               f"({cp.accepted} accepted, {cp.rejected} rejected in all)")  # fmt: skip
    if st.rejected:
        for line in st.rejected_examples:
            print_(f"  {line}")
        print_(f"rejected records are in {rj_path}")
        raise typer.Exit(1)


@app.command()
def doctor(
    url: Url = None,
    data_dir: DataDir = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each component")] = 5.0,
) -> None:
    """Check a deployment (server, broker, store, migrations, worker lag, clocks) and say
    what is wrong and how to fix it. Exit code 1 when something is wrong."""
    from rich.console import Console

    from runtime.doctor import Context, Finding, Status, run_checks
    from runtime.roles import running_server

    settings = _settings(data_dir)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    running = running_server(settings) if settings.embedded else None
    ctx = Context(
        settings,
        (url or settings.url or running or "").rstrip("/") or None,
        timeout,
        embedded_server_running=bool(running),
    )
    console = Console(highlight=False, soft_wrap=True)
    marks = {
        Status.OK: "[green]ok  [/]",
        Status.WARN: "[yellow]warn[/]",
        Status.FAIL: "[red]FAIL[/]",
        Status.SKIP: "[dim]skip[/]",
    }

    def show(f: Finding) -> None:
        console.print(f"{marks[f.status]} {f.check}: {f.message}")
        if f.fix:
            console.print(f"     [bold]fix:[/] {f.fix}")

    findings = run_checks(ctx, show)
    failed = [f for f in findings if f.status is Status.FAIL]
    warned = [f for f in findings if f.status is Status.WARN]
    if failed:
        console.print(f"[red]{len(failed)} problem(s)[/], {len(warned)} warning(s)")
        raise typer.Exit(1)
    console.print(f"[green]no problems[/], {len(warned)} warning(s)")


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


@app.command("secrets-key")
def secrets_key() -> None:
    """Print a new key for TALLY_SECRETS_KEY (seals webhook secrets at rest)."""
    from api.secretbox import generate_key

    typer.echo(generate_key())
