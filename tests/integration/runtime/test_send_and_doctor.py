"""Reading files for `tally events send` (resume by offset gives the same records), and the
doctor's direct checks against a real Tansu broker and a real chDB store."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store
from runtime.doctor import (
    Context,
    Status,
    check_broker,
    check_migrations,
    check_worker,
    run_checks,
)
from runtime.send import Format, read_records
from schemas.envelope import group_rows
from streams.lag import LogProbe
from tally.settings import Settings


def _write_ndjson(path: Path, n: int) -> list[dict[str, Any]]:
    events = [{"type": "t", "customer": f"c{i % 3}", "properties": {"i": i}} for i in range(n)]
    lines = [json.dumps(e) for e in events]
    lines.insert(5, "")  # blank lines are skipped but keep their line number
    lines.insert(9, "{broken")
    path.write_text("\ufeff" + "\n".join(lines) + "\n")
    return events


def test_ndjson_resume_from_any_offset_reads_the_same_records(tmp_path: Path) -> None:
    path = tmp_path / "events.ndjson"
    _write_ndjson(path, 50)
    full = list(read_records(path, Format.NDJSON))
    assert [r.number for r in full if r.error] == [10]
    assert len([r for r in full if r.event]) == 50
    assert full[-1].end == path.stat().st_size
    assert full[0].event is not None and full[0].event["id"].startswith("h-")
    for cut in (1, 7, 9, 30, len(full) - 1):
        rest = list(read_records(path, Format.NDJSON, skip_records=full[cut - 1].number,
                                 offset=full[cut - 1].end or 0))  # fmt: skip
        assert rest == full[cut:]


def test_csv_and_json_records(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "type", "customer", "time", "tokens", "note"])
        for i in range(20):
            w.writerow([f"r{i}" if i % 2 else "", "llm", f"c{i % 2}", "2026-01-01T00:00:00Z", i,
                        "multi\nline" if i == 3 else ""])  # fmt: skip
    recs = list(read_records(path, Format.CSV))
    assert [r.number for r in recs] == list(range(1, 21))
    assert recs[3].event is not None and recs[3].event["properties"] == {
        "tokens": "3",
        "note": "multi\nline",
    }
    assert recs[1].event is not None and recs[1].event["id"] == "r1"
    for cut in (1, 3, 4, 19):
        rest = list(read_records(path, Format.CSV, skip_records=cut, offset=recs[cut - 1].end or 0))
        assert rest == recs[cut:]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,customer\nx,y\n")
    with pytest.raises(ValueError, match="type"):
        list(read_records(bad, Format.CSV))
    js = tmp_path / "events.json"
    js.write_text(json.dumps([{"id": "a", "type": "t", "customer": "c"}, 5]))
    got = list(read_records(js, Format.JSON))
    assert [r.event is not None for r in got] == [True, False]
    assert list(read_records(js, Format.JSON, skip_records=1)) == got[1:]


def test_doctor_direct_checks(broker: Any, topic: str, store: Store, chdb_dir: Path) -> None:
    settings = Settings(
        kafka_bootstrap=broker.bootstrap,
        clickhouse_url=f"chdb://{chdb_dir}",
        clickhouse_database=store.database,
        events_topic=topic,
        events_partitions=4,
    )
    ctx = Context(settings, None, timeout=5)
    broker_findings = check_broker(ctx)
    assert [f.status for f in broker_findings] == [Status.OK, Status.OK], broker_findings
    assert [f.status for f in check_migrations(ctx)] == [Status.OK]
    assert [f.status for f in check_worker(ctx, sample_s=0.5)] == [Status.OK]

    # Envelopes in the topic and no worker: the doctor says the worker is not storing them.
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": broker.bootstrap})
    rows = [(f"e{i}", "t", "c", 1_700_000_000_000, {}) for i in range(40)]
    for env in group_rows("tenant", 1_700_000_000_000, rows, 4):
        p.produce(topic, env.payload, b"tenant", partition=env.partition)
    assert p.flush(10) == 0
    worker = check_worker(ctx, sample_s=1.0)
    assert [f.status for f in worker] == [Status.FAIL], worker
    assert "wait in the topic" in worker[0].message and "tally worker" in worker[0].fix

    # A worker that stores everything (its progress rows reach the end of every partition).
    sink = ClickHouseSink(store)
    assert sink.progress(topic) == {}
    probe = LogProbe(broker.bootstrap, topic)
    ends = {x.partition: x.end for x in probe.measure({p: -1 for p in range(4)}).partitions}
    probe.close()
    sink.commit(topic, [], [], {p: end - 1 for p, end in ends.items() if end > 0})
    assert [f.status for f in check_worker(ctx, sample_s=0.5)] == [Status.OK]
    ctx.close()

    # The whole run, as `tally doctor` does it; the unmigrated database is named.
    fresh = Settings(
        kafka_bootstrap=broker.bootstrap,
        clickhouse_url=f"chdb://{chdb_dir}",
        clickhouse_database=store.database + "_empty",
        events_topic=topic,
        events_partitions=4,
    )
    found = run_checks(Context(fresh, None, timeout=5))
    failed = {f.check: f for f in found if f.status is Status.FAIL}
    assert "migrations" in failed and "tally migrate" in failed["migrations"].fix
    assert any(f.check == "secrets key" and f.status is Status.WARN for f in found)
    store.command(f"DROP DATABASE IF EXISTS {store.database}_empty")


def test_doctor_names_an_unreachable_broker_and_server(tmp_path: Path) -> None:
    settings = Settings(
        kafka_bootstrap="127.0.0.1:9",
        clickhouse_url="http://127.0.0.1:9",
        data_dir=tmp_path,
    )
    found = run_checks(Context(settings, "http://127.0.0.1:9", timeout=2))
    failed = {f.check: f for f in found if f.status is Status.FAIL}
    assert set(failed) >= {"server", "broker", "store"}, found
    assert "cannot reach the broker at 127.0.0.1:9" in failed["broker"].message
    assert "TALLY_CLICKHOUSE_URL" in failed["store"].fix
