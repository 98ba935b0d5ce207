"""Write history straight into the store, in the formats the worker writes, to reach a stored
volume (1M, 10M events) in seconds instead of hours. Runs in a child process (``jobs.run_job``):
embedded chDB allows one process per directory, so `tally run` must be stopped meanwhile.

What the worker would have written for the same events, had they been ingested over the span:

- ``events``: one row per event (``clickhouse.sink.EVENTS_COLUMNS``), properties as the compact
  JSON the client sent, ``ingested_at`` a little after ``time`` (hours to days for late events),
  source position = a past topic generation ``tally.events.g<ms>``, partition
  ``crc32(tenant \\0 id) % partitions`` (``schemas.envelope.partition_for``), envelopes of
  ``ENVELOPE_EVENTS`` events per offset;
- ``usage_minute``: per meter, customer and minute one delta row with origin ``'s'`` (count:
  events; sum/max/latest: value count/sum/min/max; unique_count: the sorted distinct values;
  latest: max of ``(time_ms, event_id, value)``), the same per meter, customer and UTC day as
  day rows (``clickhouse.rollup``), and one progress row per partition
  (``clickhouse.sink.progress_row``) so that the worker knows the generation is stored;
- ``meters``: the tenant's meters are re-versioned with ``created_at`` before the span, as if
  they had existed all along (the worker counts only events ingested after a meter's creation).

Duplicates are not written: the ledger holds deduplicated events.
"""

from __future__ import annotations

import math
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

from benchmarks.jobs import Progress
from benchmarks.workload import (
    ENDPOINTS,
    LATE_MAX_MS,
    LATE_MIN_MS,
    MEAN_TOKENS,
    METERS,
    REGIONS,
    USERS,
    customer_name,
    user_name,
    zipf_weights,
)

ENVELOPE_EVENTS = 125  # ~ a 1000-event request split over 8 partitions
CHUNK_EVENTS = 500_000
DAY_MS = 86_400_000
_CHUNK_TABLE = "bench_history_chunk"


@dataclass
class HistorySpec:
    store_url: str
    database: str
    tenant_ids: list[str]
    target_events: int  # stored events (whole ledger) after the write
    span_start_ms: int
    span_end_ms: int
    customers: int
    zipf_s: float
    late_rate: float
    partitions: int
    seed: int
    tag: str  # makes ids and the topic generation unique per write
    query_n: int = 0  # direct query timings after the write (0 = none)
    query_warmup: int = 0
    query_budget_s: float | None = None


def _one_insert_settings() -> dict[str, Any]:
    from clickhouse.sink import ONE_PART_SETTINGS

    # A fresh dedup token: a table with an insert deduplication window must never drop our
    # block as a repeat of an earlier one.
    return {**ONE_PART_SETTINGS, "insert_deduplication_token": f"bench-history/{uuid.uuid4().hex}"}


def _usage_sql(db: str, *, days: bool = False) -> str:
    """The chunk's minute rows; ``days``: their day rows (``clickhouse.rollup``)."""
    from clickhouse.rollup import DAY_MS, DAY_PREFIX
    from clickhouse.sink import USAGE_COLUMNS

    numeric = "m.3 IN ('sum', 'max', 'min', 'avg', 'latest')"
    dec = "toDecimal128(tokens, 9)"
    meter = f"concat('{DAY_PREFIX}', m.2)" if days else "m.2"
    width = DAY_MS if days else 60_000
    return (
        f"INSERT INTO {db}.usage_minute ({', '.join(USAGE_COLUMNS)}) "
        f"SELECT tenant_id, {meter} AS meter_id, customer, "
        f"fromUnixTimestamp64Milli(intDiv(time_ms, {width}) * {width}, 'UTC') AS window_start, "
        "'' AS group_key, 's' AS origin, CAST(map(), 'Map(String, String)') AS group_values, "
        "count() AS events, "
        f"toUInt64(if({numeric}, count(), 0)) AS value_count, "
        f"if({numeric}, sum({dec}), toDecimal128(0, 9)) AS value_sum, "
        f"if({numeric}, min({dec}), NULL) AS value_min, "
        f"if({numeric}, max({dec}), NULL) AS value_max, "
        "if(m.3 = 'unique_count', arraySort(groupUniqArrayIf(user, m.3 = 'unique_count')), "
        "CAST([], 'Array(String)')) AS uniq_values, "
        f"if(m.3 = 'latest', maxIf((time_ms, event_id, {dec}), m.3 = 'latest'), "
        "(toInt64(0), '', toDecimal128(0, 9))) AS latest, "
        "toInt64(0) AS source_offset "
        f"FROM {db}.{_CHUNK_TABLE} "
        "ARRAY JOIN arrayFilter(x -> x.1 = tenant_id, {meters:Array(Tuple(String, String, String))}) AS m "
        "GROUP BY tenant_id, m.2, m.3, customer, window_start"
    )


def write_history(spec: HistorySpec, *, progress: Progress) -> dict[str, Any]:
    """(child process) Bring the store to ``target_events`` stored events; then, optionally,
    time the query shapes directly on the store. Returns what was written and the timings."""
    import numpy as np
    import pyarrow as pa

    from benchmarks.queries import time_direct
    from clickhouse.sink import EVENTS_COLUMNS, USAGE_COLUMNS, progress_row
    from clickhouse.store import Store

    store = Store.open(spec.store_url, spec.database)
    db = spec.database
    try:
        before = int(store.query_rows(f"SELECT count() FROM {db}.events")[0][0])
        to_add = max(0, spec.target_events - before)
        meters = _meters(store, db, spec.tenant_ids)
        t0 = time.perf_counter()
        topic = f"tally.events.g{spec.span_end_ms}.h{spec.tag}"
        if to_add:
            _backdate_meters(store, db, spec.tenant_ids, spec.span_start_ms - DAY_MS)
            store.command(
                f"CREATE TABLE IF NOT EXISTS {db}.{_CHUNK_TABLE} (tenant_id String, "
                "event_id String, customer String, time_ms Int64, tokens Int64, user String) "
                "ENGINE = Memory"
            )
            rng = np.random.default_rng(spec.seed)
            cum = np.cumsum(zipf_weights(spec.customers, spec.zipf_s))
            customers = np.array([customer_name(i) for i in range(spec.customers)], dtype=object)
            users = np.array([user_name(i) for i in range(USERS)], dtype=object)
            offsets = [0] * spec.partitions  # next offset per partition
            n_chunks = math.ceil(to_add / CHUNK_EVENTS)
            span = spec.span_end_ms - spec.span_start_ms
            seq = 0
            usage_sqls = [_usage_sql(db), _usage_sql(db, days=True)]
            for c in range(n_chunks):
                n = min(CHUNK_EVENTS, to_add - c * CHUNK_EVENTS)
                lo = spec.span_start_ms + span * c // n_chunks
                hi = spec.span_start_ms + span * (c + 1) // n_chunks
                ingested = np.sort(rng.integers(lo, hi, n))
                late = rng.random(n) < spec.late_rate
                delay = np.where(
                    late,
                    rng.integers(LATE_MIN_MS, LATE_MAX_MS, n),
                    rng.integers(50, 2000, n),
                )
                time_ms = ingested - delay
                tenant_ix = rng.integers(0, len(spec.tenant_ids), n)
                ranks = np.minimum(np.searchsorted(cum, rng.random(n)), spec.customers - 1)
                tokens = np.floor(rng.exponential(MEAN_TOKENS, n)).astype(np.int64) + 1
                user_ix = rng.integers(0, USERS, n)
                ep_ix = rng.integers(0, len(ENDPOINTS), n)
                rg_ix = rng.integers(0, len(REGIONS), n)
                tenants = [spec.tenant_ids[i] for i in tenant_ix.tolist()]
                ids = [f"h{spec.tag}-{seq + i:010d}" for i in range(n)]
                seq += n
                parts = np.fromiter(
                    (
                        zlib.crc32(f"{t}\x00{e}".encode()) % spec.partitions
                        for t, e in zip(tenants, ids, strict=True)
                    ),
                    dtype=np.int32,
                    count=n,
                )
                # Envelopes: per partition, consecutive events (in ingestion order) share an
                # offset, ENVELOPE_EVENTS at a time.
                order = np.argsort(parts, kind="stable")
                pos = np.empty(n, dtype=np.int64)
                src_off = np.empty(n, dtype=np.int64)
                sorted_parts = parts[order]
                for p in range(spec.partitions):
                    idx = order[sorted_parts == p]
                    k = np.arange(len(idx), dtype=np.int64)
                    pos[idx] = k % ENVELOPE_EVENTS
                    src_off[idx] = offsets[p] + k // ENVELOPE_EVENTS
                    offsets[p] += math.ceil(len(idx) / ENVELOPE_EVENTS)
                cust = customers[ranks].tolist()
                usr = users[user_ix].tolist()
                tok = tokens.tolist()
                props = [
                    f'{{"endpoint":"{ENDPOINTS[a]}","region":"{REGIONS[b]}","tokens":{t},"user":"{u}"}}'
                    for a, b, t, u in zip(ep_ix.tolist(), rg_ix.tolist(), tok, usr, strict=True)
                ]
                ts = pa.array(time_ms, pa.timestamp("ms", tz="UTC"))
                cols = {
                    "tenant_id": pa.array(tenants, pa.string()),
                    "event_id": pa.array(ids, pa.string()),
                    "event_type": pa.array([METERS[0]["event_type"]] * n, pa.string()),
                    "customer": pa.array(cust, pa.string()),
                    "time": ts,
                    "properties": pa.array(props, pa.string()),
                    "ingested_at": pa.array(ingested, pa.timestamp("ms", tz="UTC")),
                    "source_topic": pa.array([topic] * n, pa.string()),
                    "source_partition": pa.array(parts, pa.int32()),
                    "source_offset": pa.array(src_off, pa.int64()),
                    "source_index": pa.array(pos.astype(np.uint32), pa.uint32()),
                }
                store.client.insert_arrow(
                    f"{db}.events",
                    pa.table([cols[k] for k in EVENTS_COLUMNS], names=EVENTS_COLUMNS),
                )
                store.command(f"TRUNCATE TABLE {db}.{_CHUNK_TABLE}")
                store.client.insert_arrow(
                    f"{db}.{_CHUNK_TABLE}",
                    pa.table(
                        [
                            cols["tenant_id"],
                            cols["event_id"],
                            cols["customer"],
                            pa.array(time_ms, pa.int64()),
                            pa.array(tokens, pa.int64()),
                            pa.array(usr, pa.string()),
                        ],
                        names=["tenant_id", "event_id", "customer", "time_ms", "tokens", "user"],
                    ),
                )
                for sql in usage_sqls:
                    store.command(sql, {"meters": meters}, settings=_one_insert_settings())
                progress(c + 1, n_chunks, "writing history")
            store.command(f"DROP TABLE IF EXISTS {db}.{_CHUNK_TABLE}")
            prog = [progress_row(topic, p, o - 1) for p, o in enumerate(offsets) if o > 0]
            store.insert("usage_minute", prog, USAGE_COLUMNS, settings=_one_insert_settings())
        write_s = time.perf_counter() - t0
        stats = store_stats(store, db)
        out: dict[str, Any] = {
            "events_before": before,
            "events_written": to_add,
            "write_s": write_s,
            "topic": topic if to_add else None,
            **stats,
        }
        if spec.query_n:
            _settle(store, db)
            out["direct_queries"] = time_direct(
                store,
                spec.tenant_ids,
                spec.query_n,
                spec.query_warmup,
                spec.customers,
                spec.zipf_s,
                spec.seed,
                progress,
                spec.query_budget_s,
            )
        return out
    finally:
        store.close()


def _settle(store: Any, db: str, timeout_s: float = 180.0) -> None:
    """Wait (bounded) until the background merges of the fresh parts are done, so that the
    direct query timings do not share the CPU with them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = store.query_rows(
            "SELECT count() FROM system.merges WHERE database = {db:String}", {"db": db}
        )
        if not int(rows[0][0]):
            return
        time.sleep(0.5)


def _meters(store: Any, db: str, tenant_ids: list[str]) -> list[tuple[str, str, str]]:
    """(tenant_id, meter_id, aggregation) of the workload's meters of every tenant."""
    import orjson

    rows = store.query_rows(
        f"SELECT tenant_id, slug, meter_id, spec FROM {db}.meters FINAL "
        "WHERE deleted = 0 AND tenant_id IN {tenants:Array(String)}",
        {"tenants": tenant_ids},
    )
    want = {m["slug"]: m["aggregation"] for m in METERS}
    found: list[tuple[str, str, str]] = []
    seen = set()
    for tenant_id, slug, meter_id, spec in rows:
        if slug in want:
            agg = str(orjson.loads(spec).get("aggregation", "")).lower()
            if agg != want[slug]:
                raise RuntimeError(f"meter {slug} of {tenant_id} is {agg}, expected {want[slug]}")
            found.append((tenant_id, meter_id, agg))
            seen.add((tenant_id, slug))
    missing = [(t, s) for t in tenant_ids for s in want if (t, s) not in seen]
    if missing:
        raise RuntimeError(f"meters missing in the store: {missing[:5]}")
    return found


def _backdate_meters(store: Any, db: str, tenant_ids: list[str], created_ms: int) -> None:
    """A new version of each meter created at ``created_ms`` (if it was created later)."""
    store.command(
        f"INSERT INTO {db}.meters (tenant_id, slug, meter_id, spec, created_at, deleted, version) "
        "SELECT tenant_id, slug, meter_id, spec, fromUnixTimestamp64Milli({ms:Int64}, 'UTC'), "
        f"deleted, version + 1 FROM {db}.meters FINAL "
        "WHERE tenant_id IN {tenants:Array(String)} "
        "AND created_at > fromUnixTimestamp64Milli({ms:Int64}, 'UTC')",
        {"tenants": tenant_ids, "ms": created_ms},
    )


def store_stats(store: Any, db: str) -> dict[str, int]:
    events = int(store.query_rows(f"SELECT count() FROM {db}.events")[0][0])
    usage = int(
        store.query_rows(f"SELECT count() FROM {db}.usage_minute WHERE tenant_id != ''")[0][0]
    )
    parts = store.query_rows(
        "SELECT table, count(), sum(bytes_on_disk) FROM system.parts "
        "WHERE database = {db:String} AND active GROUP BY table",
        {"db": db},
    )
    by_table = {str(t): (int(n), int(b)) for t, n, b in parts}
    return {
        "events_rows": events,
        "usage_rows": usage,
        "events_parts": by_table.get("events", (0, 0))[0],
        "usage_parts": by_table.get("usage_minute", (0, 0))[0],
        "events_bytes": by_table.get("events", (0, 0))[1],
        "usage_bytes": by_table.get("usage_minute", (0, 0))[1],
    }
