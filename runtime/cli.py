"""The `tally` command line. Entry point: configures logging, reads settings, dispatches."""

from __future__ import annotations

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
app.add_typer(tenant_app, name="tenant")
app.add_typer(keys_app, name="keys")
app.add_typer(tokens_app, name="admin-tokens")
app.add_typer(limits_app, name="limits")
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
