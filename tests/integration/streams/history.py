"""A stored history for backfill tests: ledger rows on both sides of a meter's activation markers.

The ground truth is plain Python over the generated events (never Tally's aggregation code):
every event of the meter's type and tenant counts once, whichever side (stream or backfill) it
falls on. The stream's part is written the way the worker would (origin 's'), so that usage
queries show stream + backfill and the totals can be compared with the truth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from clickhouse.repo import Repo
from clickhouse.sink import ClickHouseSink
from clickhouse.store import Store
from clickhouse.usage import run_usage
from schemas.envelope import EnvelopeEvent
from schemas.meters import Meter, MeterSpec
from schemas.timeutil import epoch_ms
from schemas.usage import UsageQuery
from streams.aggregation import WindowTable
from streams.matching import CompiledMeter

TYPE = "upload"
T0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=3)


@dataclass
class Stored:
    event_id: str
    customer: str
    time: datetime
    props: dict[str, Any]
    topic: str
    partition: int
    offset: int


@dataclass
class History:
    store: Store
    tenant: str
    meter: Meter
    topic: str
    markers: dict[int, int]
    events: list[Stored] = field(default_factory=list)

    def truth(self) -> dict[str, Decimal]:
        """customer -> sum of gb over every stored event of the meter's type (independent)."""
        out: dict[str, Decimal] = {}
        for e in self.events:
            out[e.customer] = out.get(e.customer, Decimal(0)) + Decimal(str(e.props["gb"]))
        return out

    def totals(self) -> dict[str, Decimal]:
        q = UsageQuery(
            tenant_id=self.tenant,
            meter=self.meter,
            from_=T0 - timedelta(days=1),
            to=T0 + timedelta(days=3),
            tz="UTC",
            group_by=["customer"],
        )
        return {
            (r.customer or r.group_by.get("customer", "")): r.value or Decimal(0)
            for r in run_usage(self.store, q)
        }

    def backfill_side(self) -> list[Stored]:
        return [
            e
            for e in self.events
            if e.topic != self.topic or e.offset < self.markers.get(e.partition, 1 << 62)
        ]


def _row(tenant: str, e: Stored, etype: str = TYPE) -> tuple[Any, ...]:
    return (
        tenant,
        e.event_id,
        etype,
        e.customer,
        e.time,
        orjson.dumps(e.props).decode(),
        e.time,
        e.topic,
        e.partition,
        e.offset,
        0,
    )


def make_history(
    store: Store,
    *,
    n: int = 600,
    topic: str = "tally.events.g2000",
    older: str = "tally.events.g1000",
    partitions: int = 4,
    seed: int = 11,
) -> History:
    """``n`` events in the meter's topic (markers in the middle of each partition) and ``n // 4``
    in an older generation; noise of another type and another tenant; some rows stored twice."""
    rnd = random.Random(seed)
    repo = Repo(store)
    tenant, _ = repo.create_tenant("hist")
    other, _ = repo.create_tenant("other")
    spec = MeterSpec(
        slug="gb",
        event_type=TYPE,
        aggregation="sum",  # type: ignore[arg-type]
        value_property="$.gb",
        group_by={"region": "$.region"},
    )
    meter = repo.activate_meter(repo.create_meter(tenant.tenant_id, spec, activation_topic=topic))
    per_part = n // partitions
    markers = {p: rnd.randrange(per_part // 4, 3 * per_part // 4) for p in range(partitions)}
    h = History(store, tenant.tenant_id, meter, topic, markers)
    sink = ClickHouseSink(store)

    def new(i: int, t: str, p: int, off: int) -> Stored:
        props = {"gb": rnd.choice([rnd.randint(1, 9), f"{rnd.randint(1, 99)}.5"])}
        props["region"] = rnd.choice(["eu", "us"])
        when = T0 + timedelta(minutes=rnd.randrange(0, 2 * 24 * 60), milliseconds=i)
        return Stored(f"e{i:06d}-{rnd.randrange(10**6)}", f"c{i % 5}", when, props, t, p, off)

    i = 0
    for p in range(partitions):  # the older generation: entirely history
        for off in range(n // 4 // partitions):
            h.events.append(new(i, older, p, off))
            i += 1
    for p in range(partitions):
        off = 0
        for _ in range(per_part):
            if off == markers[p]:
                off += 1  # the marker's own offset holds no event
            h.events.append(new(i, topic, p, off))
            i += 1
            off += 1
    rows = [_row(tenant.tenant_id, e) for e in h.events]
    noise = [_row(tenant.tenant_id, new(90_000 + k, topic, 0, 0), "other") for k in range(20)]
    noise += [_row(other.tenant_id, new(95_000 + k, older, 1, k)) for k in range(20)]
    for t in (older, topic):
        ours = [r for r in rows if r[7] == t]
        progress: dict[int, int] = {}
        for r in ours:
            progress[r[8]] = max(progress.get(r[8], -1), r[9])
        sink.commit(t, ours, [], progress)
    sink.commit(topic, noise + rows[:50], [], {})  # noise, and replayed rows (identical)
    sink.record_activations([(tenant.tenant_id, meter.id, topic, p, o) for p, o in markers.items()])
    # the stream's share (what the worker counted after the markers), origin 's'
    compiled = CompiledMeter(meter)
    table = WindowTable()
    for e in h.events:
        if e.topic == topic and e.offset > markers[e.partition]:
            ev = EnvelopeEvent(e.event_id, TYPE, e.customer, epoch_ms(e.time), e.props)
            c = compiled.match(ev)
            assert c is not None
            table.add(tenant.tenant_id, e.customer, ev.time_ms, e.event_id, c)
    sink.commit(topic, [], table.rows(), {})
    return h
