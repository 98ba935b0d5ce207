"""A stored world for correction tests: seven meters (every aggregation) activated by markers in
the middle of each partition, ledger rows on both sides of the markers, and the stream's share
pre-aggregated the way the worker writes it (origin 's').

The ground truth is plain Python over the generated events with the corrections applied
(``truth``): never Tally's matching or aggregation code.
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
from clickhouse.usage import Repair, run_usage
from schemas.envelope import EnvelopeEvent
from schemas.meters import Meter, MeterSpec
from schemas.timeutil import epoch_ms
from schemas.usage import UsageQuery
from streams.aggregation import WindowTable
from streams.matching import CompiledMeter

TYPE = "job"
TOPIC = "tally.events.g5000"
OLDER = "tally.events.g4000"
T0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=2)
SPECS: list[dict[str, Any]] = [
    {"slug": "n", "aggregation": "count"},
    {"slug": "total", "aggregation": "sum", "value_property": "$.v", "group_by": {"region": "$.r"}},
    {"slug": "mean", "aggregation": "avg", "value_property": "$.v"},
    {"slug": "low", "aggregation": "min", "value_property": "$.v"},
    {"slug": "high", "aggregation": "max", "value_property": "$.v", "group_by": {"region": "$.r"}},
    {"slug": "users", "aggregation": "unique_count", "value_property": "$.user"},
    {"slug": "last", "aggregation": "latest", "value_property": "$.v"},
]


@dataclass
class Ev:
    id: str
    customer: str
    time: datetime
    props: dict[str, Any]
    topic: str
    partition: int
    offset: int


@dataclass
class World:
    store: Store
    tenant: str
    meters: dict[str, Meter]
    markers: dict[int, int]
    events: list[Ev] = field(default_factory=list)
    fixes: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # id -> props | void

    # --- which side ---------------------------------------------------------------------------
    def stream_side(self, e: Ev) -> bool:
        return e.topic == TOPIC and e.offset > self.markers[e.partition]

    def pick(self, stream: bool, rnd: random.Random, **want: Any) -> Ev:
        """A not yet voided event of the given side (whose properties match ``want``)."""
        cands = [
            e
            for e in self.events
            if self.stream_side(e) == stream
            and self.fixes.get(e.id, e.props) is not None
            and all(self.props(e).get(k) == v for k, v in want.items())
        ]
        return rnd.choice(cands)

    def props(self, e: Ev) -> dict[str, Any]:
        p = self.fixes.get(e.id, e.props)
        assert p is not None
        return p

    # --- the ground truth ---------------------------------------------------------------------
    def truth(
        self, slug: str, *, backfilled: bool = True, by_region: bool = False
    ) -> dict[Any, Decimal]:
        """customer (or (customer, region)) -> the meter's value over every counted event."""
        groups: dict[Any, list[tuple[int, str, dict[str, Any]]]] = {}
        for e in self.events:
            if not backfilled and not self.stream_side(e):
                continue
            p = self.fixes.get(e.id, e.props)
            if p is None:
                continue
            key = (e.customer, p["r"]) if by_region else e.customer
            groups.setdefault(key, []).append((epoch_ms(e.time), e.id, p))
        out: dict[Any, Decimal] = {}
        for key, items in groups.items():
            vals = [Decimal(str(p["v"])) for _, _, p in items]
            if slug == "n":
                out[key] = Decimal(len(items))
            elif slug == "total":
                out[key] = sum(vals, Decimal(0))
            elif slug == "mean":
                out[key] = sum(vals, Decimal(0)) / len(vals)
            elif slug == "low":
                out[key] = min(vals)
            elif slug == "high":
                out[key] = max(vals)
            elif slug == "users":
                out[key] = Decimal(len({p["user"] for _, _, p in items}))
            elif slug == "last":
                out[key] = Decimal(str(max(items, key=lambda i: (i[0], i[1]))[2]["v"]))
        return out

    # --- what Tally answers -------------------------------------------------------------------
    def usage(
        self, slug: str, repair: Repair | None, *, by_region: bool = False
    ) -> dict[Any, Decimal]:
        q = UsageQuery(
            tenant_id=self.tenant,
            meter=self.meters[slug],
            from_=T0 - timedelta(days=1),
            to=T0 + timedelta(days=1),
            tz="UTC",
            group_by=["customer", "region"] if by_region else ["customer"],
        )
        out: dict[Any, Decimal] = {}
        for r in run_usage(self.store, q, repair):
            customer = r.customer or r.group_by.get("customer", "")
            key = (customer, r.group_by.get("region")) if by_region else customer
            assert r.value is not None, (slug, key)
            out[key] = Decimal(r.value)
        return out

    # --- writing as the worker does -----------------------------------------------------------
    def ledger(self, evs: list[Ev]) -> None:
        rows = [
            (
                self.tenant,
                e.id,
                TYPE,
                e.customer,
                e.time,
                orjson.dumps(e.props).decode(),
                e.time,
                e.topic,
                e.partition,
                e.offset,
                0,
            )
            for e in evs
        ]
        ClickHouseSink(self.store).commit(TOPIC, rows, [], {})

    def stream(self, evs: list[Ev]) -> None:
        """The worker's flush of ``evs`` (stream side only): their usage rows, origin 's'."""
        table = WindowTable()
        for e in evs:
            assert self.stream_side(e)
            ev = EnvelopeEvent(e.id, TYPE, e.customer, epoch_ms(e.time), e.props)
            for meter in self.meters.values():
                c = CompiledMeter(meter).match(ev)
                if c is not None:
                    table.add(self.tenant, e.customer, ev.time_ms, e.id, c)
        ClickHouseSink(self.store).commit(TOPIC, [], table.rows(), {})

    def add_late(self, e: Ev) -> None:
        self.events.append(e)
        self.ledger([e])
        self.stream([e])


def make_world(store: Store, *, n: int = 240, partitions: int = 2, seed: int = 3) -> World:
    rnd = random.Random(seed)
    repo = Repo(store)
    tenant, _ = repo.create_tenant("corr")
    meters = {}
    for spec in SPECS:
        m = repo.create_meter(
            tenant.tenant_id,
            MeterSpec.model_validate({**spec, "event_type": TYPE}),
            activation_topic=TOPIC,
        )
        meters[spec["slug"]] = repo.activate_meter(m)
    per = n // partitions
    markers = {p: rnd.randrange(per // 3, 2 * per // 3) for p in range(partitions)}
    w = World(store, tenant.tenant_id, meters, markers)
    i = 0

    def new(topic: str, p: int, off: int) -> Ev:
        nonlocal i
        i += 1
        v: Any = rnd.choice([rnd.randint(1, 60), f"{rnd.randint(1, 60)}.25"])
        props = {"v": v, "r": rnd.choice(["eu", "us"]), "user": f"u{rnd.randrange(12)}"}
        when = T0 + timedelta(
            minutes=rnd.randrange(0, 8), seconds=rnd.randrange(60), milliseconds=i
        )
        return Ev(f"e{i:05d}", f"c{rnd.randrange(3)}", when, props, topic, p, off)

    for p in range(partitions):  # an older generation: all history
        for off in range(n // 8):
            w.events.append(new(OLDER, p, off))
    for p in range(partitions):
        off = 0
        for _ in range(per):
            if off == markers[p]:
                off += 1  # the marker itself
            w.events.append(new(TOPIC, p, off))
            off += 1
    w.ledger(w.events)
    ClickHouseSink(store).record_activations(
        [(w.tenant, m.id, TOPIC, p, o) for m in meters.values() for p, o in markers.items()]
    )
    w.stream([e for e in w.events if w.stream_side(e)])
    return w
