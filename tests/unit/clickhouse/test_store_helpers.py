"""Pure helpers of clickhouse.store / clickhouse.repo / clickhouse.sink (no database)."""

from __future__ import annotations

from decimal import Decimal

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clickhouse.repo import hash_secret, is_tenant_id, new_tenant_id, tenant_of_key
from clickhouse.sink import EPOCH, USAGE_COLUMNS, progress_row, progress_table
from clickhouse.store import Store, check_identifier, split_statements
from schemas.columns import usage_table
from tally.errors import ValidationError


def test_split_statements_drops_comment_lines_and_splits_at_line_ends() -> None:
    sql = (
        "-- header; with a semicolon\n"
        "CREATE TABLE a (x String) -- trailing comment\n"
        "ENGINE = Memory;\n"
        "\n"
        "  -- another; comment\n"
        "INSERT INTO a VALUES ('a;b');   \n"
        "SELECT 1"
    )
    assert split_statements(sql) == [
        "CREATE TABLE a (x String) -- trailing comment\nENGINE = Memory",
        "INSERT INTO a VALUES ('a;b')",
        "SELECT 1",
    ]
    assert split_statements("-- only comments;\n\n") == []


@pytest.mark.parametrize("name", ["tally", "_x", "Test_123"])
def test_identifier_ok(name: str) -> None:
    assert check_identifier(name) == name


@pytest.mark.parametrize("name", ["", "1a", "a b", "a.b", "a;b", "a`b", "x" * 200])
def test_identifier_rejected(name: str) -> None:
    with pytest.raises(ValidationError):
        check_identifier(name, "table")


def test_new_tenant_ids_are_lowercase_base32() -> None:
    ids = {new_tenant_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(is_tenant_id(t) and len(t) == 12 and "_" not in t for t in ids)


@given(secret=st.text(min_size=1, max_size=60))
def test_tenant_of_key(secret: str) -> None:
    tid = "abcdefgh2345"
    key = f"tly_{tid}_{secret}"
    assert tenant_of_key(key) == tid
    assert tenant_of_key(f"tly_{tid}{secret}") is None or secret.startswith("_")
    assert tenant_of_key(f"tlx_{tid}_{secret}") is None
    assert tenant_of_key(f"tly_{tid.upper()}_{secret}") is None


def test_hash_is_sha256_hex() -> None:
    assert hash_secret("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_progress_row_shape() -> None:
    row = progress_row("tally.events", 3, 1234)
    assert len(row) == len(USAGE_COLUMNS)
    r = dict(zip(USAGE_COLUMNS, row, strict=True))
    assert (r["tenant_id"], r["meter_id"], r["customer"], r["group_key"]) == (
        "",
        "~progress",
        "tally.events",
        "3",
    )
    assert r["window_start"] == EPOCH and r["origin"] == "s" and r["source_offset"] == 1234
    assert r["events"] == 0 and r["value_sum"] == Decimal(0) and r["value_min"] is None


@given(
    topic=st.text(max_size=30),
    partition=st.integers(0, 2**31 - 1),
    offset=st.integers(-1, 2**63 - 1),
)
def test_progress_table_equals_the_converted_progress_row(
    topic: str, partition: int, offset: int
) -> None:
    """The template-built progress row (the worker's commit) is the row ``usage_table`` makes."""
    want = usage_table([progress_row(topic, partition, offset)])
    got = progress_table(topic, partition, offset)
    assert got.schema == want.schema
    assert got.equals(want)
    assert got.to_pylist() == want.to_pylist()


class _Capture:
    """The driver as ``Store.insert_arrow`` sees it: records what it is handed."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, pa.Table]] = []

    def insert_arrow(self, table: str, data: pa.Table, settings: object = None) -> None:
        self.sent.append((table, data))


def test_insert_arrow_hands_the_driver_one_record_batch() -> None:
    rows = [progress_row("topic-a", p, 10 * p) for p in range(4)]
    many = pa.concat_tables([usage_table([r]) for r in rows])
    assert many.column("group_values").num_chunks == 4
    client = _Capture()
    store = Store(client, "db")
    store.insert_arrow("usage_minute", many)
    store.insert_arrow("usage_minute", usage_table(rows[:1]))
    store.insert_arrow("usage_minute", usage_table([]))  # nothing sent
    (t1, first), (_t2, second) = client.sent
    assert t1 == "db.usage_minute"
    assert len(first.to_batches()) == 1 and first.equals(many)
    assert len(second.to_batches()) == 1
