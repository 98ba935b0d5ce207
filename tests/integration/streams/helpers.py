"""Shared helpers of the streams integration tests (real Tansu broker + real chDB)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from clickhouse.repo import Repo
from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store
from schemas.envelope import group
from schemas.events import Event
from schemas.meters import Meter, MeterSpec
from schemas.timeutil import epoch_ms, from_epoch_ms, utc_now
from streams.worker import WorkerRunner
from tally.settings import Settings, get_settings

PARTITIONS = 4


def worker_settings(bootstrap: str, topic: str, group_id: str, data_dir: Path) -> Settings:
    return get_settings(
        kafka_bootstrap=bootstrap,
        events_topic=topic,
        events_partitions=PARTITIONS,
        consumer_group=group_id,
        broker_session_timeout_s=10.0,
        flush_interval_s=0.2,
        flush_max_events=2_000,
        data_dir=data_dir,
    )


def create_meters(store: Store) -> tuple[str, dict[str, Meter]]:
    repo = Repo(store)
    tenant, _ = repo.create_tenant("acme")
    specs = {
        "calls": MeterSpec(slug="calls", event_type="api", aggregation="count"),  # type: ignore[arg-type]
        "bytes": MeterSpec(
            slug="bytes",
            event_type="api",
            aggregation="sum",  # type: ignore[arg-type]
            value_property="$.bytes",
            group_by={"region": "$.region"},
        ),
        "eu_max": MeterSpec(
            slug="eu_max",
            event_type="api",
            aggregation="max",  # type: ignore[arg-type]
            value_property="$.bytes",
            filters=[{"property": "$.region", "op": "eq", "value": "eu"}],  # type: ignore[list-item]
        ),
        "users": MeterSpec(
            slug="users",
            event_type="api",
            aggregation="unique_count",
            value_property="$.user",  # type: ignore[arg-type]
        ),
        "last": MeterSpec(
            slug="last",
            event_type="api",
            aggregation="latest",
            value_property="$.bytes",  # type: ignore[arg-type]
        ),
    }
    meters = {slug: repo.create_meter(tenant.tenant_id, spec) for slug, spec in specs.items()}
    time.sleep(0.01)  # events are ingested strictly after the meters were created
    return tenant.tenant_id, meters


@dataclass
class Truth:
    """Ground truth computed independently of streams/: first produced copy of an id wins."""

    tenant: str
    first: dict[str, Event] = field(default_factory=dict)
    produced: int = 0
    last_offsets: dict[int, int] = field(default_factory=dict)

    def add(self, ev: Event) -> None:
        self.produced += 1
        self.first.setdefault(ev.id, ev)

    def totals(self) -> dict[str, Any]:
        evs = list(self.first.values())
        by_region: dict[str, Decimal] = {}
        for e in evs:
            r = e.properties.get("region", "")
            by_region[r] = by_region.get(r, Decimal(0)) + Decimal(str(e.properties["bytes"]))
        eu = [Decimal(str(e.properties["bytes"])) for e in evs if e.properties["region"] == "eu"]
        latest = max((epoch_ms(e.time), e.id, Decimal(str(e.properties["bytes"]))) for e in evs)
        return {
            "events": len(evs),
            "calls": len(evs),
            "bytes_by_region": by_region,
            "eu_max": max(eu),
            "users": len({e.properties["user"] for e in evs}),
            "last": latest,
            "windows_calls": _windows(evs),
        }


def _windows(evs: list[Event]) -> dict[int, int]:
    out: dict[int, int] = {}
    for e in evs:
        ms = epoch_ms(e.time)
        w = ms - ms % 60_000
        out[w] = out.get(w, 0) + 1
    return out


class EventSource:
    """Deterministic random events with duplicates (same id re-sent, in and across envelopes,
    with a different payload: the first copy must win) and late events (hours to 30 days old)."""

    def __init__(self, truth: Truth, seed: int = 7) -> None:
        self.rnd = random.Random(seed)
        self.truth = truth
        self.sent: list[Event] = []
        self.n = 0

    def batch(self, size: int, dup_rate: float = 0.2) -> list[Event]:
        now = utc_now()
        out: list[Event] = []
        for _ in range(size):
            if self.sent and self.rnd.random() < dup_rate:
                old = self.rnd.choice(self.sent + out) if out else self.rnd.choice(self.sent)
                props = dict(old.properties)
                props["bytes"] = self.rnd.randint(1, 10_000)  # different payload, same id
                out.append(
                    Event(
                        id=old.id,
                        type="api",
                        customer=old.customer,
                        time=old.time,
                        properties=props,
                    )
                )
                continue
            self.n += 1
            late = self.rnd.random() < 0.1
            age_ms = (
                self.rnd.randint(3_600_000, 30 * 86_400_000)
                if late
                else self.rnd.randint(0, 180_000)
            )
            t = from_epoch_ms(epoch_ms(now) - age_ms)
            out.append(
                Event(
                    id=f"ev-{self.n}",
                    type="api",
                    customer=f"cust-{self.rnd.randint(1, 5)}",
                    time=t,
                    properties={
                        "bytes": self.rnd.choice(
                            [self.rnd.randint(1, 10_000), f"{self.rnd.randint(1, 999)}.25"]
                        ),
                        "region": self.rnd.choice(["eu", "us", "ap"]),
                        "user": f"u{self.rnd.randint(1, 40)}",
                    },
                )
            )
        self.sent.extend(out)
        return out


def produce(
    bootstrap: str, topic: str, truth: Truth, events: list[Event], max_events: int = 200
) -> None:
    """Group into envelopes per partition (as the API does) and produce them, in order."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    errors: list[Any] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err)
        else:
            p = msg.partition()
            truth.last_offsets[p] = max(truth.last_offsets.get(p, -1), msg.offset())

    for env in group(truth.tenant, epoch_ms(utc_now()), events, PARTITIONS, max_events):
        producer.produce(
            topic,
            value=env.payload,
            key=truth.tenant.encode(),
            partition=env.partition,
            on_delivery=on_delivery,
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    assert not errors, errors
    for e in events:
        truth.add(e)


def wait_stored(
    sink: ClickHouseSink, topic: str, targets: dict[int, int], timeout: float = 90
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = sink.progress(topic)
        if all(progress.get(p, -1) >= off for p, off in targets.items()):
            return
        time.sleep(0.1)
    raise AssertionError(f"worker did not store up to {targets}; progress {sink.progress(topic)}")


def day_rows_by_key(store: Store, tenant: str, *, day_rows: bool) -> dict[tuple, tuple]:
    """The tenant's stream rows aggregated by (meter, customer, UTC day, group): from the minute
    rows, or from the day rows (clickhouse.rollup) under their meter's own id."""
    db = store.database
    rows = store.query_rows(
        f"SELECT {'substring(meter_id, 3)' if day_rows else 'meter_id'} AS meter, customer, "
        "toStartOfDay(window_start) AS day, group_key, sum(events), sum(value_count), "
        "sum(value_sum), min(value_min), max(value_max), "
        "arraySort(groupUniqArrayArray(uniq_values)), max(latest) "
        f"FROM {db}.usage_minute WHERE tenant_id = {{tenant:String}} AND origin = 's' "
        f"AND {'' if day_rows else 'NOT '}startsWith(meter_id, 'd:') "
        "GROUP BY meter, customer, day, group_key",
        {"tenant": tenant},
    )
    return {tuple(r[:4]): tuple(r[4:]) for r in rows}


def stored_totals(store: Store, tenant: str, meters: dict[str, Meter]) -> dict[str, Any]:
    """What the store holds for the tenant; and its day rows agree with its minute rows (a
    link's day rows land with it, once)."""
    db = store.database
    minutes = day_rows_by_key(store, tenant, day_rows=False)
    assert day_rows_by_key(store, tenant, day_rows=True) == minutes

    def q(sql: str, **params: Any) -> list[tuple]:
        return store.query_rows(sql, {"tenant": tenant, **params})

    def mid(slug: str) -> dict[str, Any]:
        return {"m": meters[slug].id}

    (events,) = q(f"SELECT count() FROM {db}.events FINAL WHERE tenant_id = {{tenant:String}}")[0]
    (calls,) = q(
        f"SELECT sum(events) FROM {db}.usage_minute WHERE tenant_id = {{tenant:String}} "
        "AND meter_id = {m:String}",
        **mid("calls"),
    )[0]
    by_region = dict(
        q(
            f"SELECT group_values['region'], sum(value_sum) FROM {db}.usage_minute "
            "WHERE tenant_id = {tenant:String} AND meter_id = {m:String} GROUP BY 1",
            **mid("bytes"),
        )
    )
    (eu_max,) = q(
        f"SELECT max(value_max) FROM {db}.usage_minute WHERE tenant_id = {{tenant:String}} "
        "AND meter_id = {m:String}",
        **mid("eu_max"),
    )[0]
    (users,) = q(
        f"SELECT length(groupUniqArrayArray(uniq_values)) FROM {db}.usage_minute "
        "WHERE tenant_id = {tenant:String} AND meter_id = {m:String}",
        **mid("users"),
    )[0]
    (last,) = q(
        f"SELECT max(latest) FROM {db}.usage_minute WHERE tenant_id = {{tenant:String}} "
        "AND meter_id = {m:String}",
        **mid("last"),
    )[0]
    windows = dict(
        q(
            f"SELECT toUnixTimestamp64Milli(window_start), sum(events) FROM {db}.usage_minute "
            "WHERE tenant_id = {tenant:String} AND meter_id = {m:String} GROUP BY 1",
            **mid("calls"),
        )
    )
    return {
        "events": int(events),
        "calls": int(calls),
        "bytes_by_region": {k: Decimal(v) for k, v in by_region.items()},
        "eu_max": Decimal(eu_max),
        "users": int(users),
        "last": (int(last[0]), last[1], Decimal(last[2])),
        "windows_calls": {int(k): int(v) for k, v in windows.items()},
    }


class Worker:
    """A WorkerRunner in a background thread (context manager)."""

    def __init__(self, settings: Settings, sink: Any, dedupe_dir: Path) -> None:
        self.runner = WorkerRunner(settings, sink, dedupe_dir=dedupe_dir)

    def start(self) -> Worker:
        assert self.runner.start(timeout=90), "worker did not get its partitions"
        return self

    def stop(self, flush: bool = True) -> None:
        self.runner.stop(timeout=30, flush=flush)
        assert not self.runner.running
        assert self.runner.error is None, self.runner.error

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.runner.running:
            self.stop()


def run_in_thread(fn: Any, *args: Any) -> Iterator[threading.Thread]:
    th = threading.Thread(target=fn, args=args, daemon=True)
    th.start()
    yield th
