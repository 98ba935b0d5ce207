"""The chDB HTTP bridge serves clickhouse-connect's real HttpClient from separate processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
import urllib3
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from clickhouse_connect.driver.external import ExternalData
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.chdb_http import REPO_ROOT, start_server, stop_server


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("chdb_http")
    proc, url = start_server(base / "data", log_file=base / "bridge.log")
    yield url
    assert stop_server(proc) == 0, (base / "bridge.log").read_text()


@pytest.fixture
def client(bridge: str) -> Iterator[Client]:
    c = clickhouse_connect.get_client(dsn=bridge)
    yield c
    c.close()


@pytest.fixture
def db(client: Client, unique: str) -> Iterator[str]:
    name = f"bridge_{unique}"
    client.command(f"CREATE DATABASE {name}")
    yield name
    client.command(f"DROP DATABASE IF EXISTS {name}")


TYPED_COLUMNS = {
    "id": "UInt32",
    "ts": "DateTime64(3, 'UTC')",
    "amount": "Decimal(38, 9)",
    "labels": "Map(String, String)",
    "tags": "Array(String)",
    "note": "Nullable(String)",
    "pair": "Tuple(String, Int64)",
}


def _typed_rows() -> list[tuple[Any, ...]]:
    return [
        (
            1,
            datetime(2024, 3, 31, 23, 59, 59, 123000, tzinfo=UTC),
            Decimal("12345678901234567890.123456789"),
            {"region": "eu", "tier": "gold"},
            ["a", "b'c", "tab\there"],
            None,
            ("x", -5),
        ),
        (
            2,
            datetime(1999, 12, 31, 0, 0, 0, 1000, tzinfo=UTC),
            Decimal("-0.000000001"),
            {},
            [],
            "ünïcødé\n\\",
            ("", 2**62),
        ),
        (
            3,
            datetime(2038, 1, 19, 3, 14, 8, 999000, tzinfo=UTC),
            Decimal("0"),
            {"k": ""},
            [""],
            "",
            ("y", 0),
        ),
    ]


def _create_typed(client: Client, table: str) -> None:
    cols = ", ".join(f"{k} {v}" for k, v in TYPED_COLUMNS.items())
    client.command(f"CREATE TABLE {table} ({cols}) ENGINE = MergeTree ORDER BY id")


def test_ping_and_server_info(bridge: str, client: Client) -> None:
    resp = urllib3.request("GET", f"{bridge}/ping")
    assert resp.status == 200
    assert resp.data == b"Ok.\n"
    assert client.ping()
    assert (client.server_version or "").split(".")[0].isdigit()
    assert client.command("SELECT 1") == 1
    # A result-producing statement with no rows returns "", DDL returns a summary.
    assert client.command("SELECT 1 WHERE 0") == ""


def test_ddl_and_parameterized_queries(client: Client, db: str) -> None:
    assert db in client.query("SHOW DATABASES").result_columns[0]
    client.command(
        f"CREATE TABLE {db}.kv (k String, n Int64, tags Array(String)) "
        "ENGINE = MergeTree ORDER BY k"
    )
    client.insert(
        f"{db}.kv",
        [["a", 1, ["x"]], ["b'\t", 2, ["y", "z"]], ["c", 3, []]],
        column_names=["k", "n", "tags"],
    )
    rows = client.query(
        f"SELECT k, n FROM {db}.kv WHERE k = {{x:String}} OR n > {{n:Int64}} ORDER BY k",
        parameters={"x": "b'\t", "n": 2},
    ).result_rows
    assert rows == [("b'\t", 2), ("c", 3)]
    rows = client.query(
        f"SELECT k FROM {db}.kv WHERE hasAny(tags, {{t:Array(String)}}) ORDER BY k",
        parameters={"t": ["z", "x"]},
    ).result_rows
    assert rows == [("a",), ("b'\t",)]
    # client-side binding (%(name)s) goes through the same HTTP path
    assert client.command(f"SELECT count() FROM {db}.kv WHERE n >= %(n)s", {"n": 2}) == 2
    # column metadata probe (LIMIT 0 -> FORMAT JSON)
    res = client.query(f"SELECT k, n FROM {db}.kv LIMIT 0")
    assert res.column_names == ("k", "n")
    assert res.result_rows == []


@pytest.mark.parametrize("compress", [True, "lz4", "zstd", "gzip", False])
def test_typed_inserts_round_trip(bridge: str, unique: str, compress: bool | str) -> None:
    client = clickhouse_connect.get_client(dsn=bridge, compress=compress, tz_mode="aware")
    db = f"typed_{unique}"
    try:
        client.command(f"CREATE DATABASE {db}")
        rows = _typed_rows()
        _create_typed(client, f"{db}.by_row")
        _create_typed(client, f"{db}.by_col")
        names = list(TYPED_COLUMNS)
        s = client.insert(f"{db}.by_row", rows, column_names=names)
        assert s.written_rows == len(rows)
        columns = [list(c) for c in zip(*rows, strict=True)]
        client.insert(f"{db}.by_col", columns, column_names=names, column_oriented=True)
        for table in ("by_row", "by_col"):
            got = client.query(f"SELECT * FROM {db}.{table} ORDER BY id").result_rows
            assert got == rows, table
            cols = client.query(f"SELECT * FROM {db}.{table} ORDER BY id").result_columns
            assert [list(c) for c in cols] == columns
    finally:
        client.command(f"DROP DATABASE IF EXISTS {db}")
        client.close()


def test_raw_insert_and_command_with_data(client: Client, db: str) -> None:
    client.command(f"CREATE TABLE {db}.r (a Int32, s String) ENGINE = MergeTree ORDER BY a")
    client.raw_insert(f"{db}.r", ["a", "s"], "1,one\n2,two\n", fmt="CSV")
    client.command(
        f"INSERT INTO {db}.r FORMAT JSONEachRow", data='{"a": 3, "s": "three"}\n{"a": 4, "s": ""}'
    )
    client.command(f"INSERT INTO {db}.r VALUES (5, 'five')")
    raw = client.raw_query(f"SELECT a, s FROM {db}.r ORDER BY a", fmt="TabSeparated")
    assert raw == b"1\tone\n2\ttwo\n3\tthree\n4\t\n5\tfive\n"


def test_streaming_a_large_result(client: Client) -> None:
    total = 0
    count = 0
    with client.query_row_block_stream("SELECT number FROM system.numbers LIMIT 300000") as s:
        for block in s:
            count += len(block)
            total += sum(r[0] for r in block)
    assert count == 300000
    assert total == 299999 * 300000 // 2


def test_sql_errors_raise_database_error(client: Client, db: str) -> None:
    with pytest.raises(DatabaseError, match="Syntax error") as syntax:
        client.query("SELEC 1")
    assert syntax.value.code == 62
    with pytest.raises(DatabaseError, match="UNKNOWN_TABLE") as missing:
        client.command(f"SELECT * FROM {db}.no_such_table")
    assert missing.value.code == 60
    with pytest.raises(DatabaseError, match="Unknown setting"):
        client.query("SELECT 1", settings={"no_such_setting_xyz": 1})
    # the connection and the session stay usable after errors
    assert client.command("SELECT 2") == 2


def test_settings_are_per_query_and_sessions_are_isolated(bridge: str, client: Client) -> None:
    assert client.command("SELECT getSetting('max_threads')", settings={"max_threads": 3}) == 3
    assert client.command("SELECT getSetting('max_threads')") != 3
    client.command("SET max_block_size = 1234")
    client.command("CREATE TEMPORARY TABLE tmp_x (a Int8)")
    client.command("INSERT INTO tmp_x VALUES (7)")
    assert client.command("SELECT getSetting('max_block_size')") == 1234
    assert client.command("SELECT a FROM tmp_x") == 7
    other = clickhouse_connect.get_client(dsn=bridge)
    try:
        assert other.command("SELECT getSetting('max_block_size')") != 1234
        with pytest.raises(DatabaseError):
            other.command("SELECT a FROM tmp_x")
    finally:
        other.close()
    sessionless = clickhouse_connect.get_client(dsn=bridge, autogenerate_session_id=False)
    try:
        sessionless.command("SET max_block_size = 4321")
        assert sessionless.command("SELECT getSetting('max_block_size')") != 4321
    finally:
        sessionless.close()


def test_database_in_the_dsn(bridge: str, db: str) -> None:
    c = clickhouse_connect.get_client(dsn=f"{bridge}/{db}", tz_mode="aware")
    try:
        assert c.command("SELECT currentDatabase()") == db
        c.command("CREATE TABLE t (d DateTime('UTC')) ENGINE = Memory")
        c.insert("t", [[datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)]], column_names=["d"])
        assert c.query("SELECT d FROM t").result_rows == [
            (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),)
        ]
        assert c.command(f"EXISTS TABLE {db}.t") == 1
    finally:
        c.close()


def test_external_data_is_rejected_loudly(client: Client) -> None:
    ext = ExternalData(data=b"1\n2\n", file_name="ext", structure="a UInt8")
    with pytest.raises(DatabaseError, match="External data is not supported"):
        client.query("SELECT sum(a) FROM ext", external_data=ext)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    text=st.text(st.characters(codec="utf-8"), max_size=40),
    amount=st.decimals(
        min_value=Decimal("-99999999999999999999999999999.999999999"),
        max_value=Decimal("99999999999999999999999999999.999999999"),
        places=9,
        allow_nan=False,
        allow_infinity=False,
    ),
    words=st.lists(st.text(max_size=8), max_size=4),
)
def test_server_side_binds_round_trip(
    client: Client, text: str, amount: Decimal, words: list[str]
) -> None:
    row = client.query(
        "SELECT {s:String}, {d:Decimal(38, 9)}, {w:Array(String)}",
        parameters={"s": text, "d": amount, "w": words},
    ).result_rows[0]
    assert row == (text, amount, words)


WRITER = textwrap.dedent(
    """
    import sys
    import clickhouse_connect
    url, table, writer, batches, per_batch = sys.argv[1:6]
    c = clickhouse_connect.get_client(dsn=url)
    w, b, n = int(writer), int(batches), int(per_batch)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    for i in range(b):
        base = (w * b + i) * n
        c.insert(table, [[base + j, w] for j in range(n)], column_names=["id", "writer"])
    c.close()
    print("done", w)
    """
)


def test_two_processes_insert_concurrently(bridge: str, client: Client, db: str) -> None:
    table = f"{db}.conc"
    client.command(f"CREATE TABLE {table} (id UInt64, writer UInt8) ENGINE = MergeTree ORDER BY id")
    batches, per_batch, writers = 40, 250, 2
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, bridge, table, str(w), str(batches), str(per_batch)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for w in range(writers)
    ]
    for p in procs:  # every writer is connected before any of them inserts
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        p.stdin.close()
    for p in procs:
        assert p.stdout is not None
        out = p.stdout.read()
        p.stdout.close()
        assert p.wait(timeout=300) == 0, out.decode()
        assert out.startswith(b"done"), out.decode()
    expected = writers * batches * per_batch
    assert client.command(f"SELECT count(), uniqExact(id), max(id) FROM {table}") == [
        str(expected),
        str(expected),
        str(expected - 1),
    ]
    per_writer = client.query(
        f"SELECT writer, count() FROM {table} GROUP BY writer ORDER BY writer"
    ).result_rows
    assert per_writer == [(w, batches * per_batch) for w in range(writers)]


def test_kill_9_keeps_acknowledged_inserts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc, url = start_server(data, log_file=tmp_path / "bridge.log")
    port = int(url.rsplit(":", 1)[1])
    try:
        c = clickhouse_connect.get_client(dsn=url)
        c.command("CREATE DATABASE crash")
        c.command("CREATE TABLE crash.t (id UInt64) ENGINE = MergeTree ORDER BY id")
        for i in range(20):
            c.insert("crash.t", [[i * 100 + j] for j in range(100)], column_names=["id"])
        c.close()
    finally:
        proc.kill()
        proc.wait()
        stop_server(proc)
    assert proc.returncode == -9
    # same directory, same port: clients configured with the old URL reconnect
    proc2, url2 = start_server(data, port=port, log_file=tmp_path / "bridge.log")
    try:
        assert url2 == url
        c = clickhouse_connect.get_client(dsn=url2)
        assert c.command("SELECT count(), uniqExact(id) FROM crash.t") == ["2000", "2000"]
        c.insert("crash.t", [[5000]], column_names=["id"])
        assert c.command("SELECT count() FROM crash.t") == 2001
        c.close()
    finally:
        assert stop_server(proc2) == 0


def test_second_bridge_on_a_locked_directory_fails_fast(tmp_path: Path) -> None:
    proc, _ = start_server(tmp_path / "data", log_file=tmp_path / "a.log")
    try:
        with pytest.raises(RuntimeError, match="exited"):
            start_server(tmp_path / "data", log_file=tmp_path / "b.log")
    finally:
        stop_server(proc)


def test_threads_sharing_a_sessionless_client(bridge: str, db: str) -> None:
    """Like Tally's Store: one client without a session, used by many threads, varying settings."""
    c = clickhouse_connect.get_client(dsn=bridge, autogenerate_session_id=False)
    c.command(f"CREATE TABLE {db}.th (a Int64, w Int32) ENGINE = MergeTree ORDER BY a")
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            for i in range(15):
                rows = [[w * 1000 + i * 10 + j, w] for j in range(10)]
                c.insert(
                    f"{db}.th", rows, column_names=["a", "w"], settings={"max_threads": 1 + w % 3}
                )
                got = c.query(
                    f"SELECT count(), getSetting('max_threads') FROM {db}.th WHERE w = {{w:Int32}}",
                    parameters={"w": w},
                    settings={"max_threads": 1 + w % 3},
                ).result_rows
                assert got == [((i + 1) * 10, 1 + w % 3)], (w, i, got)
        except BaseException as ex:
            errors.append(ex)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c.close()
    assert errors == []
