"""Store (migrations, errors) and Repo (tenants, keys, admin tokens, meters) on real chDB."""

from __future__ import annotations

from pathlib import Path

import pytest

from clickhouse.repo import Repo, hash_secret
from clickhouse.store import MIGRATIONS_DIR, Store, migration_files, open_store
from runtime.roles import admin_token_line
from schemas.meters import Aggregation, MeterSpec
from tally.errors import Conflict, NotFound, StoreUnavailable, ValidationError
from tally.settings import Settings, get_settings
from tests.integration.clickhouse.groundtruth import correction_row


def _all_text(store: Store, table: str) -> str:
    rows = store.query_rows(f"SELECT * FROM {store.database}.{table}")
    return "\n".join(repr(r) for r in rows)


# --- store -------------------------------------------------------------------------------------


def test_migrate_is_idempotent(store: Store) -> None:
    names = [p.name for p in migration_files(MIGRATIONS_DIR)]
    assert "001_core.sql" in names
    assert store.migrate() == []  # the fixture already migrated
    applied = store.query_rows(f"SELECT name FROM {store.database}.schema_migrations FINAL")
    assert sorted(r[0] for r in applied) == sorted(names)
    tables = {r[0] for r in store.query_rows(f"SHOW TABLES FROM {store.database}")}
    assert {"tenants", "api_keys", "admin_tokens", "meters", "events", "usage_minute"} <= tables


def test_hot_tables_merge_wider(store: Store) -> None:
    """Migration 080: the tables every flush writes to merge with merge_selector_base = 10
    (the store's default, 5, stays on every other table)."""
    rows = store.query_rows(
        "SELECT name, create_table_query FROM system.tables WHERE database = {db:String} "
        "AND name IN ('events', 'usage_minute', 'meters')",
        {"db": store.database},
    )
    ddl = dict(rows)
    assert set(ddl) == {"events", "usage_minute", "meters"}
    assert "merge_selector_base = 10" in ddl["events"]
    assert "merge_selector_base = 10" in ddl["usage_minute"]
    assert "merge_selector_base" not in ddl["meters"]


def test_migrate_applies_new_files_once(store: Store, tmp_path: Path) -> None:
    for p in migration_files(MIGRATIONS_DIR):
        (tmp_path / p.name).write_text(p.read_text())
    (tmp_path / "999_extra.sql").write_text(
        "-- a comment; with a semicolon\n"
        "CREATE TABLE IF NOT EXISTS {db}.extra (tenant_id String) ENGINE = MergeTree ORDER BY tenant_id;\n"
        "INSERT INTO {db}.extra VALUES ('x');\n"
    )
    assert store.migrate(tmp_path) == ["999_extra.sql"]
    assert store.migrate(tmp_path) == []
    assert store.query_rows(f"SELECT count() FROM {store.database}.extra") == [(1,)]


def test_fresh_database_migrates_from_scratch(chdb_dir: Path, unique: str) -> None:
    st = Store.open(f"chdb://{chdb_dir}", f"fresh_{unique}")
    try:
        assert st.migrate() == [p.name for p in migration_files(MIGRATIONS_DIR)]
        assert st.migrate() == []
    finally:
        st.command(f"DROP DATABASE IF EXISTS {st.database}")
        st.close()


def test_open_store_from_settings(chdb_dir: Path, unique: str) -> None:
    st = open_store(
        Settings(clickhouse_url=f"chdb://{chdb_dir}", clickhouse_database=f"s_{unique}")
    )
    try:
        assert st.query_rows("SELECT 1") == [(1,)]
    finally:
        st.command(f"DROP DATABASE IF EXISTS {st.database}")
        st.close()


def test_driver_errors_become_store_unavailable(store: Store) -> None:
    with pytest.raises(StoreUnavailable):
        store.query_rows(f"SELECT * FROM {store.database}.no_such_table")
    with pytest.raises(StoreUnavailable):
        Store.open("http://127.0.0.1:1", "tally")


def test_bad_identifiers_and_urls_are_validation_errors(chdb_dir: Path) -> None:
    with pytest.raises(ValidationError) as ei:
        Store.open(f"chdb://{chdb_dir}", "x; DROP DATABASE y")
    assert [d["field"] for d in ei.value.details] == ["database"]
    with pytest.raises(ValidationError):
        Store.open("chdb://relative/dir", "tally")
    with pytest.raises(ValidationError):
        Store.open("ftp://host", "tally")


# --- tenants and keys --------------------------------------------------------------------------


def test_tenants_and_keys(store: Store) -> None:
    repo = Repo(store)
    tenant, key = repo.create_tenant("Acme")
    assert len(tenant.tenant_id) == 12 and "_" not in tenant.tenant_id
    assert key.startswith(f"tly_{tenant.tenant_id}_")
    assert repo.get_tenant(tenant.tenant_id) == tenant
    assert tenant.created_at.tzinfo is not None
    assert repo.get_tenant(tenant.tenant_id).created_at == tenant.created_at
    assert tenant in repo.list_tenants()
    with pytest.raises(NotFound, match="nosuchtenant"):
        repo.get_tenant("nosuchtenant")

    assert repo.authenticate(key) == tenant.tenant_id
    second = repo.create_api_key(tenant.tenant_id)
    assert second != key and repo.authenticate(second) == tenant.tenant_id
    # only the hash is stored: neither key nor its secret appears anywhere in the table
    text = _all_text(store, "api_keys")
    for k in (key, second):
        assert hash_secret(k) in text
        assert k not in text and k.split("_", 2)[2] not in text
    for bad in (
        "",
        "tly_",
        key[:-1],
        key + "x",
        "tly_" + "a" * 12 + "_nope",
        "x" * 10_000,
        key.replace(tenant.tenant_id, "bbbbbbbbbbbb"),
    ):
        assert repo.authenticate(bad) is None
    with pytest.raises(NotFound):
        repo.create_api_key("zzzzzzzzzzzz")


def test_keys_of_one_tenant_never_authenticate_as_another(store: Store) -> None:
    repo = Repo(store)
    a, ka = repo.create_tenant("A")
    b, kb = repo.create_tenant("B")
    assert repo.authenticate(ka) == a.tenant_id
    assert repo.authenticate(kb) == b.tenant_id
    # a's secret under b's tenant id is not a key
    forged = f"tly_{b.tenant_id}_{ka.split('_', 2)[2]}"
    assert repo.authenticate(forged) is None


def test_authenticate_is_not_cached_in_the_store_layer(store: Store) -> None:
    """Caching (with bounded TTLs) is the API's job; the repo always answers from the store."""
    repo = Repo(store)
    t, key = repo.create_tenant("C")
    assert repo.authenticate(key) == t.tenant_id
    store.command(f"TRUNCATE TABLE {store.database}.api_keys")
    assert repo.authenticate(key) is None


def test_admin_token(store: Store) -> None:
    repo = Repo(store)
    token = repo.ensure_admin_token()
    assert token
    assert repo.ensure_admin_token() is None
    assert repo.check_admin_token(token)
    assert not repo.check_admin_token(token + "x")
    assert not repo.check_admin_token("")
    assert repo.ensure_admin_token("fixed-token-123") == "fixed-token-123"
    assert repo.ensure_admin_token("fixed-token-123") is None
    assert repo.check_admin_token("fixed-token-123") and repo.check_admin_token(token)
    text = _all_text(store, "admin_tokens")
    assert token not in text and "fixed-token-123" not in text


def test_fixed_admin_token_on_empty_store(store: Store) -> None:
    repo = Repo(store)
    assert repo.ensure_admin_token("given") == "given"
    assert repo.ensure_admin_token() is None
    assert repo.check_admin_token("given")


# --- meters ------------------------------------------------------------------------------------


def _spec(slug: str = "api-calls", **kw: object) -> MeterSpec:
    base: dict[str, object] = dict(
        slug=slug,
        event_type="api_call",
        aggregation=Aggregation.SUM,
        value_property="$.tokens",
        group_by={"model": "$.model"},
        filters=[{"property": "$.status", "op": "in", "value": [200, 201]}],
    )
    base.update(kw)
    return MeterSpec.model_validate(base)


def test_meters_crud_conflict_and_isolation(store: Store) -> None:
    repo = Repo(store)
    a, _ = repo.create_tenant("A")
    b, _ = repo.create_tenant("B")
    m = repo.create_meter(a.tenant_id, _spec())
    assert len(m.id) == 32 and m.tenant_id == a.tenant_id and m.created_at.tzinfo is not None
    got = repo.get_meter(a.tenant_id, "api-calls")
    assert got == m
    assert got.filters == _spec().filters and got.group_by == {"model": "$.model"}
    with pytest.raises(Conflict, match="api-calls"):
        repo.create_meter(a.tenant_id, _spec())

    # tenant B sees nothing of A's and may use the same slug independently
    with pytest.raises(NotFound, match="meter 'api-calls' not found"):
        repo.get_meter(b.tenant_id, "api-calls")
    assert repo.list_meters(b.tenant_id) == []
    with pytest.raises(NotFound):
        repo.delete_meter(b.tenant_id, "api-calls")
    mb = repo.create_meter(b.tenant_id, _spec(aggregation="count", value_property=None))
    assert repo.get_meter(a.tenant_id, "api-calls") == m

    m2 = repo.create_meter(a.tenant_id, _spec("second"))
    assert [x.slug for x in repo.list_meters(a.tenant_id)] == ["api-calls", "second"]
    assert {x.id for x in repo.all_meters()} >= {m.id, m2.id, mb.id}

    repo.delete_meter(a.tenant_id, "api-calls")
    with pytest.raises(NotFound):
        repo.get_meter(a.tenant_id, "api-calls")
    with pytest.raises(NotFound):
        repo.delete_meter(a.tenant_id, "api-calls")
    assert [x.slug for x in repo.list_meters(a.tenant_id)] == ["second"]
    assert m.id not in {x.id for x in repo.all_meters()}
    assert repo.get_meter(b.tenant_id, "api-calls") == mb

    # re-creating a deleted slug gives a new id; the old one stays gone
    m3 = repo.create_meter(a.tenant_id, _spec())
    assert m3.id != m.id and repo.get_meter(a.tenant_id, "api-calls") == m3
    with pytest.raises(NotFound):
        repo.create_meter("nosuchtenant", _spec("x"))


def test_the_start_line_never_echoes_a_given_admin_token(store: Store) -> None:
    """`tally run` prints a token it generated (once); one given in TALLY_ADMIN_TOKEN is stored
    but not printed (stdout ends up in logs; the operator already has it)."""
    given = get_settings(admin_token="tla_given-by-the-operator")
    line = admin_token_line(Repo(store), given)
    assert line is not None and "TALLY_ADMIN_TOKEN" in line and "tla_given" not in line
    assert admin_token_line(Repo(store), given) is None  # stored already: nothing to say
    assert Repo(store).check_admin_token("tla_given-by-the-operator")


def test_the_start_line_shows_a_generated_admin_token_once(store: Store) -> None:
    line = admin_token_line(Repo(store), get_settings(admin_token=""))
    assert line is not None and line.startswith("Admin token (shown once, keep it): ")
    assert Repo(store).check_admin_token(line.rsplit(" ", 1)[1])
    assert admin_token_line(Repo(store), get_settings(admin_token="")) is None


def test_meters_and_limits_of_many_tenants_in_one_read(store: Store) -> None:
    """The batched reads of the API's background cache refresh agree with the one-by-one
    reads: live meters only, tenants' own rows only, defaults for tenants without limits."""
    from clickhouse.limits import LimitOverrides, LimitsRepo

    repo = Repo(store)
    a, _ = repo.create_tenant("A")
    b, _ = repo.create_tenant("B")
    c, _ = repo.create_tenant("C")
    ma = repo.create_meter(a.tenant_id, _spec())
    repo.create_meter(a.tenant_id, _spec("gone"))
    repo.delete_meter(a.tenant_id, "gone")
    mb = repo.create_meter(b.tenant_id, _spec("b-only"))
    repo.create_meter(c.tenant_id, _spec("c-only"))
    got = [u.meter for u in repo.usage_meters_of([a.tenant_id, b.tenant_id, "nosuchtenant"])]
    one_by_one = [*repo.list_meters(a.tenant_id), *repo.list_meters(b.tenant_id)]
    assert got == sorted(one_by_one, key=lambda m: (m.tenant_id, m.slug))
    assert {(m.tenant_id, m.slug) for m in got} == {
        (ma.tenant_id, ma.slug),
        (mb.tenant_id, mb.slug),
    }
    assert repo.usage_meters_of([]) == []

    limits = LimitsRepo(store)
    limits.put(a.tenant_id, LimitOverrides(requests_per_second=5, monthly_events=0))
    limits.put(a.tenant_id, LimitOverrides(requests_per_second=7))  # the newest wins
    limits.put(c.tenant_id, LimitOverrides(max_batch_events=100))
    many = limits.get_many([a.tenant_id, b.tenant_id])
    assert many == {a.tenant_id: limits.get(a.tenant_id), b.tenant_id: LimitOverrides()}
    assert many[a.tenant_id] == LimitOverrides(requests_per_second=7)
    assert limits.get_many([]) == {}


def test_usage_meters_know_when_the_stream_alone_answers(store: Store) -> None:
    """``stream_only`` (what the API caches to skip a statement per usage query) is false
    exactly for the meters with a complete backfill run or a correction, and never true where
    the per-query check (``usage_state_sql``) would find either."""
    from dataclasses import replace
    from datetime import UTC, datetime, timedelta

    from clickhouse.backfill import BackfillStore
    from clickhouse.queries import usage_state_sql
    from schemas.backfill import COMPLETE, RUNNING, RunRecord
    from schemas.usage import UsageQuery

    repo = Repo(store)
    a, _ = repo.create_tenant("A")
    b, _ = repo.create_tenant("B")
    a1 = repo.create_meter(a.tenant_id, _spec("a1"))
    a2 = repo.create_meter(a.tenant_id, _spec("a2"))
    b1 = repo.create_meter(b.tenant_id, _spec("b1"))
    tenants = [a.tenant_id, b.tenant_id]
    t0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)

    def flags() -> dict[str, bool]:
        many = {u.meter.slug: u.stream_only for u in repo.usage_meters_of(tenants)}
        one = {m.slug: repo.usage_meter(m.tenant_id, m.slug).stream_only for m in (a1, a2, b1)}
        assert many == one
        for m in (a1, a2, b1):  # true: the per-query check agrees, whatever the range
            q = UsageQuery(
                tenant_id=m.tenant_id,
                meter=m,
                from_=t0 - timedelta(days=400),
                to=t0 + timedelta(days=400),
            )
            if one[m.slug]:
                assert store.query_rows(*usage_state_sql(q, store.database)) == [(0, 0)]
        return one

    assert flags() == {"a1": True, "a2": True, "b1": True}
    bs = BackfillStore(store)
    run = RunRecord(a.tenant_id, a1.id, "r1", state=RUNNING, started_ms=1, heartbeat_ms=1)
    bs.save_run(run)
    assert flags() == {"a1": True, "a2": True, "b1": True}  # running: not visible yet
    bs.save_run(replace(run, state=COMPLETE, finished_ms=2, version=2))
    assert flags() == {"a1": False, "a2": True, "b1": True}
    correction_row(store, b.tenant_id, "", 1, t0)  # a correction's own record row names no meter
    assert flags() == {"a1": False, "a2": True, "b1": True}
    correction_row(store, a.tenant_id, a2.id, 2, t0)
    assert flags() == {"a1": False, "a2": False, "b1": True}
    with pytest.raises(NotFound):
        repo.usage_meter(a.tenant_id, "nosuch")
