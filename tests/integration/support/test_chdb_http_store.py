"""Tally's ClickHouse layer (Store, Repo, ClickHouseSink, run_usage) through the chDB HTTP bridge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from clickhouse.repo import Repo
from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store, migration_files
from clickhouse.usage import run_usage
from schemas.meters import MeterSpec
from schemas.usage import UsageQuery, WindowSize
from tests.support.chdb_http import REPO_ROOT, Bridge, start_server, stop_server

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("chdb_http_store")
    proc, url = start_server(base / "data", log_file=base / "bridge.log")
    yield url
    assert stop_server(proc) == 0, (base / "bridge.log").read_text()


@pytest.fixture
def http_store(bridge: str, unique: str) -> Iterator[Store]:
    st = Store.open(bridge, f"tally_{unique}")
    yield st
    st.command(f"DROP DATABASE IF EXISTS {st.database}")
    st.close()


def _usage_row(
    tenant: str, meter: str, customer: str, minute: int, model: str, value: str, offset: int
) -> tuple:
    v = Decimal(value)
    group_values = {"model": model}
    return (
        tenant,
        meter,
        customer,
        T0 + timedelta(minutes=minute),
        json.dumps({"model": model}, separators=(",", ":")),
        "s",
        group_values,
        1,
        1,
        v,
        v,
        v,
        [value],
        (int((T0 + timedelta(minutes=minute)).timestamp() * 1000), f"e{offset}", v),
        offset,
    )


def _event_row(tenant: str, event_id: str, customer: str, partition: int, offset: int) -> tuple:
    return (
        tenant,
        event_id,
        "request",
        customer,
        T0,
        '{"tokens": 1}',
        T0,
        "tally.events.t",
        partition,
        offset,
        0,
    )


def test_store_open_and_migrate_are_idempotent(http_store: Store) -> None:
    names = [p.name for p in migration_files()]
    assert http_store.migrate() == names
    assert http_store.migrate() == []
    tables = {
        r[0]
        for r in http_store.query_rows(
            "SELECT name FROM system.tables WHERE database = {db:String}",
            {"db": http_store.database},
        )
    }
    assert {"schema_migrations", "tenants", "meters", "events", "usage_minute"} <= tables


def test_repo_sink_commit_progress_and_usage(http_store: Store) -> None:
    http_store.migrate()
    repo = Repo(http_store)
    tenant, api_key = repo.create_tenant("Acme")
    assert repo.authenticate(api_key) == tenant.tenant_id
    meter = repo.create_meter(
        tenant.tenant_id,
        MeterSpec.model_validate(
            {
                "slug": "tokens",
                "event_type": "request",
                "aggregation": "SUM",
                "value_property": "$.tokens",
                "group_by": {"model": "$.model"},
            }
        ),
    )
    sink = ClickHouseSink(http_store)
    assert [m.id for m in sink.all_meters()] == [meter.id]
    topic = "tally.events.t"
    tid, mid = tenant.tenant_id, meter.id
    sink.commit(
        topic,
        [_event_row(tid, "e1", "c1", 0, 10), _event_row(tid, "e2", "c2", 1, 11)],
        [
            _usage_row(tid, mid, "c1", 0, "gpt", "1.500000001", 10),
            _usage_row(tid, mid, "c2", 1, "gpt", "2.25", 11),
            _usage_row(tid, mid, "c1", 61, "llama", "100", 12),
        ],
        {0: 10, 1: 11},
    )
    sink.commit(topic, [], [_usage_row(tid, mid, "c1", 2, "gpt", "0.25", 20)], {0: 20})
    assert sink.progress(topic) == {0: 20, 1: 11}
    assert sink.progress("other.topic") == {}
    seen = [r for chunk in sink.seen_ids(topic, 0, 0, 20, 0) for r in chunk]
    assert seen == [(tid, "e1")]

    hourly = run_usage(
        http_store,
        UsageQuery.model_validate(
            {
                "tenant_id": tid,
                "meter": meter,
                "from": T0,
                "to": T0 + timedelta(hours=2),
                "window": WindowSize.HOUR,
                "group_by": ["model"],
            }
        ),
    )
    got = [(r.window_start, r.group_by["model"], r.value) for r in hourly]
    assert got == [
        (T0, "gpt", Decimal("4.000000001")),
        (T0 + timedelta(hours=1), "llama", Decimal("100")),
    ]
    per_customer = run_usage(
        http_store,
        UsageQuery.model_validate(
            {
                "tenant_id": tid,
                "meter": meter,
                "from": T0,
                "to": T0 + timedelta(hours=2),
                "by_customer": True,
            }
        ),
    )
    assert {r.customer: r.value for r in per_customer} == {
        "c1": Decimal("101.750000001"),
        "c2": Decimal("2.25"),
    }


READ_PROGRESS = textwrap.dedent(
    """
    import sys
    from clickhouse.store import Store
    from clickhouse.sink import ClickHouseSink
    st = Store.open(sys.argv[1], sys.argv[2])
    print(sorted(ClickHouseSink(st).progress(sys.argv[3]).items()))
    st.close()
    """
)


def test_progress_committed_by_one_process_is_read_by_another(
    bridge: str, http_store: Store
) -> None:
    http_store.migrate()
    ClickHouseSink(http_store).commit("t.x", [], [], {0: 5, 3: 7})
    out = subprocess.run(
        [sys.executable, "-c", READ_PROGRESS, bridge, http_store.database, "t.x"],
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.decode().strip() == "[(0, 5), (3, 7)]"


def test_store_survives_kill_9_and_restart_of_the_bridge(tmp_path: Path) -> None:
    with Bridge(tmp_path / "data", log_file=tmp_path / "bridge.log") as bridge:
        url = bridge.url
        st = Store.open(url, "tally_crash")
        try:
            st.migrate()
            sink = ClickHouseSink(st)
            for i in range(1, 11):
                sink.commit("t.crash", [], [], {i % 2: i})
            bridge.kill()
            assert bridge.start() == url
            # the same Store (same client, stale pooled connections) keeps working
            assert sink.progress("t.crash") == {0: 10, 1: 9}
            sink.commit("t.crash", [], [], {1: 11})
            assert sink.progress("t.crash") == {0: 10, 1: 11}
        finally:
            st.close()
        assert bridge.stop() == 0
