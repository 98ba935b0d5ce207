"""``ClickHouseSink.read_chain`` with ``since`` (only the parts above an earlier read's mark) on
real chDB: it skips the parts it saw, and it answers what a full read answers through commits,
replays, another writer's links, tool commits, merges and mutations."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pyarrow as pa

from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store
from schemas.columns import usage_table
from schemas.worker import ChainState

T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
TOPIC = "topic-chain"


def _usage(tenant: str, minute: int, value: int) -> pa.Table:
    one = (Decimal(value), Decimal(value), Decimal(value), [], (0, "", Decimal(0)), 0)
    row = (tenant, "m", "c1", T0 + timedelta(minutes=minute), "", "s", {}, 1, 1, *one)
    return usage_table([row])


def _parts(store: Store) -> list[tuple[int, int]]:
    return store.query_rows(
        "SELECT min_block_number, max_block_number FROM system.parts "
        "WHERE database = {db:String} AND table = 'usage_minute' AND active ORDER BY 1",
        {"db": store.database},
    )


def test_a_read_since_skips_the_parts_it_saw(store: Store) -> None:
    store.command(f"SYSTEM STOP MERGES {store.database}.usage_minute")
    sink = ClickHouseSink(store)
    for first in range(0, 30, 3):
        sink.commit_link(TOPIC, 0, first, first + 2, _usage("t", first, 1))
    full = sink.read_chain(TOPIC, [0])
    assert full.progress == {0: 29}
    assert full.mark == max(hi for _, hi in _parts(store)) and len(_parts(store)) == 10
    # an earlier state that says 5 at this mark: the parts at or below it are not read
    assert sink.read_chain(TOPIC, [0], ChainState({0: 5}, {}, full.mark)).progress == {0: 5}
    # a mark of 0, or a partition the state does not know, is a full read
    assert sink.read_chain(TOPIC, [0], ChainState({0: 5}, {}, 0)).progress == {0: 29}
    assert sink.read_chain(TOPIC, [0], ChainState({1: 5}, {}, full.mark)).progress == {0: 29}
    # what lands after the mark is read
    sink.commit_link(TOPIC, 0, 30, 31, _usage("t", 30, 1))
    after = sink.read_chain(TOPIC, [0], full)
    assert after.progress == {0: 31} and after.mark > full.mark


def test_reads_since_answer_what_full_reads_answer(store: Store) -> None:
    """A seeded walk of what can happen to ``usage_minute`` between two reads of the worker."""
    rnd = random.Random(20261204)
    sink = ClickHouseSink(store)
    db = store.database
    partitions = [0, 1, 2]
    chain = {p: -1 for p in partitions}  # the end of each partition's chain
    landed: dict[int, list[int]] = {p: [] for p in partitions}  # firsts of stored links
    state = sink.read_chain(TOPIC, partitions)
    seen = set()
    for step in range(60):
        op = rnd.choice(
            [
                "link",
                "link",
                "link",
                "replay",
                "other",
                "tool",
                "merge",
                "delete",
                "merges",
                "claim",
            ]
        )
        p = rnd.choice(partitions)
        if op == "link":
            first, last = chain[p] + 1, chain[p] + rnd.randint(1, 5)
            sink.commit_link(TOPIC, p, first, last, _usage("t", step, 1))
            chain[p] = last
            landed[p].append(first)
        elif op == "replay" and landed[p]:  # the same token again: deduplicated, no new part
            first = rnd.choice(landed[p])
            sink.commit_link(TOPIC, p, first, first + 100, _usage("t", step, 1))
        elif op == "other":  # another writer extends the chain first
            first, last = chain[p] + 1, chain[p] + rnd.randint(1, 5)
            sink.commit_link(TOPIC, p, first, last, _usage("u", step, 2))
            chain[p] = last
            landed[p].append(first)
        elif op == "tool":  # rows written outside the chain (unique token)
            sink.commit(TOPIC, [], [], {p: chain[p] + 1})
            chain[p] += 1
        elif op == "merge":
            store.command(f"OPTIMIZE TABLE {db}.usage_minute FINAL")
        elif op == "delete":  # a mutation rewrites parts (backfill deletes a tenant's rows)
            store.command(f"SYSTEM START MERGES {db}.usage_minute")  # mutations run as merges
            store.command(
                f"DELETE FROM {db}.usage_minute WHERE tenant_id = 'u'",
                settings={"mutations_sync": 2},
            )
        elif op == "merges":
            verb = rnd.choice(["STOP", "START"])
            store.command(f"SYSTEM {verb} MERGES {db}.usage_minute")
        elif op == "claim":
            sink.write_claim(TOPIC, p, step, f"w{step}")
        seen.add(op)
        asked = sorted(rnd.sample(partitions, rnd.randint(1, 3)))
        full = sink.read_chain(TOPIC, asked)
        since = sink.read_chain(TOPIC, asked, state)
        assert since.progress == full.progress, (step, op, asked)
        assert since.claims == full.claims
        assert all(full.progress.get(q, -1) == chain[q] for q in asked)
        if set(asked) == set(partitions):
            state = since
    assert {"link", "replay", "other", "tool", "merge", "delete"} <= seen
