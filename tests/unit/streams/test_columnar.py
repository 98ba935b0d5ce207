"""The columnar matching + aggregation (streams.columnar) equals the per-event reference
(``CompiledMeter.match`` + ``WindowTable``, the worker's previous hot path) on random batches."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.columns import usage_rows, usage_table
from schemas.envelope import EnvelopeEvent
from schemas.meters import Meter
from streams.aggregation import WindowTable, merge_rows
from streams.columnar import KeptEvents, aggregate
from streams.matching import CompiledMeter, MeterIndex, ValueProblem
from tests.unit.streams.fakes import meter

T0 = 1_700_000_000_000

values = st.one_of(
    st.integers(-(10**6), 10**6),
    st.sampled_from([0, 1, 2, 2.5, -0.1, 1e-10, "3", "4.25", " 7 ", "x", "", True, None]),
    st.decimals(min_value=-(10**6), max_value=10**6, allow_nan=False, places=3).map(str),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.sampled_from([float("inf"), [1], {"a": 1}, 10**30]),
)
_optional = {
    "region": st.sampled_from(["eu", "us", 1, 1.0, True, -0.0, 0, None, {"z": 1}, [1]]),
    "user": st.sampled_from(["u1", "u2", "u3", 1, 1.0, 2.5, True]),
}
props = st.one_of(
    st.fixed_dictionaries({"v": values, "w": values}, optional=_optional),
    st.fixed_dictionaries({"v": st.integers(-5, 5)}, optional=_optional),
    st.fixed_dictionaries({}, optional={"v": values, "w": values, **_optional}),
)
event = st.tuples(
    st.sampled_from(["t1", "t1", "t1", "t2"]),
    st.sampled_from([f"e{n}" for n in range(40)]),
    st.sampled_from(["api", "api", "job"]),
    st.sampled_from(["c1", "c2"]),
    # a few windows (late events fold into their own), and ties on time broken by the id
    st.one_of(st.integers(-90_000, 90_000), st.sampled_from([0, 1, 59_999])).map(lambda d: T0 + d),
    props,
    st.integers(0, 20),  # offset
)


def _meter(
    n: int,
    tenant: str,
    etype: str,
    agg: str,
    path: str | None,
    group: bool,
    filt: int,
    topic: str,
) -> Meter:
    filters: list[dict[str, Any]] = [
        [],
        [{"property": "$.region", "op": "eq", "value": "eu"}],
        [{"property": "$.v", "op": "gt", "value": 0}],
        [{"property": "$.region", "op": "in", "value": ["us", 1]}],
    ][filt]
    return meter(
        f"m{n}",
        meter_id=f"id-{n}",
        tenant_id=tenant,
        event_type=etype,
        aggregation=agg,
        value_property=None if agg == "count" else path,
        group_by={"region": "$.region"} if group else {},
        filters=filters,
        activation_topic=topic,
    )


meter_spec = st.tuples(
    st.sampled_from(["t1", "t1", "t2"]),
    st.sampled_from(["api", "api", "job"]),
    st.sampled_from(["count", "sum", "min", "max", "avg", "unique_count", "latest"]),
    st.sampled_from(["$.v", "$.w", "$.user"]),
    st.booleans(),
    st.integers(0, 3),
    st.sampled_from(["", "", "tally.events"]),  # '' applies everywhere; else by threshold
)


def _reference(
    kept: KeptEvents, index: MeterIndex, threshold: Any
) -> tuple[list[tuple[Any, ...]], int]:
    table = WindowTable()
    errors = 0
    for j in range(len(kept)):
        ev = EnvelopeEvent(
            kept.ids[j], kept.types[j], kept.customers[j], kept.times_ms[j], kept.properties[j]
        )
        for cm in index.candidates(kept.tenants[j], ev.type):
            low = threshold(cm)
            if low is None or not kept.offsets[j] > low:
                continue
            try:
                c = cm.match(ev)
            except ValueProblem:
                errors += 1
                continue
            if c is not None:
                table.add(kept.tenants[j], ev.customer, ev.time_ms, ev.id, c)
    return table.rows(), errors


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(event, min_size=10, max_size=80),
    specs=st.lists(meter_spec, min_size=1, max_size=6),
    markers=st.lists(st.one_of(st.none(), st.integers(-1, 20)), min_size=6, max_size=6),
)
def test_columnar_equals_the_per_event_reference(
    events: list[tuple[Any, ...]], specs: list[tuple[Any, ...]], markers: list[int | None]
) -> None:
    meters = [_meter(n, *spec) for n, spec in enumerate(specs)]
    index = MeterIndex(meters)
    by_id = {m.id: markers[n] for n, m in enumerate(meters)}

    def threshold(cm: CompiledMeter) -> int | None:
        return -1 if cm.activation_topic == "" else by_id[cm.id]

    kept = KeptEvents()
    seen: set[tuple[str, str]] = set()
    for tenant, eid, etype, customer, t, p, offset in events:
        if (tenant, eid) in seen:  # the link keeps one copy of an id (dedupe runs before)
            continue
        seen.add((tenant, eid))
        kept.tenants.append(tenant)
        kept.ids.append(eid)
        kept.types.append(etype)
        kept.customers.append(customer)
        kept.times_ms.append(t)
        kept.properties.append(p)
        kept.offsets.append(offset)

    want_rows, want_errors = _reference(kept, index, threshold)
    got = aggregate(kept, index, threshold)
    got_rows = usage_rows(got.usage)
    assert got.value_errors == want_errors
    assert got.usage.num_rows == len(want_rows) == got.windows
    assert merge_rows(got_rows) == merge_rows(want_rows)
    gv_got = {(r[0], r[1], r[2], r[4], r[3]): r[6] for r in got_rows}
    gv_want = {(r[0], r[1], r[2], r[4], r[3]): r[6] for r in want_rows}
    assert gv_got == gv_want
    assert all(r[5] == "s" and r[14] == 0 for r in got_rows)


@given(events=st.lists(event, max_size=40), cut=st.integers(0, 40))
@settings(max_examples=100, deadline=None)
def test_split_batches_merge_to_the_whole(events: list[tuple[Any, ...]], cut: int) -> None:
    """Two links' usage rows merged (as the store merges them) equal one link's rows."""
    index = MeterIndex(
        [
            _meter(0, "t1", "api", "sum", "$.v", False, 0, ""),
            _meter(1, "t1", "api", "latest", "$.v", True, 0, ""),
            _meter(2, "t1", "api", "unique_count", "$.user", False, 0, ""),
            _meter(3, "t2", "job", "max", "$.w", True, 0, ""),
        ]
    )

    def kept_of(evs: list[tuple[Any, ...]]) -> KeptEvents:
        k = KeptEvents()
        for tenant, eid, etype, customer, t, p, offset in evs:
            k.tenants.append(tenant)
            k.ids.append(eid)
            k.types.append(etype)
            k.customers.append(customer)
            k.times_ms.append(t)
            k.properties.append(p)
            k.offsets.append(offset)
        return k

    def always(cm: CompiledMeter) -> int | None:
        return -1

    whole = usage_rows(aggregate(kept_of(events), index, always).usage)
    a = usage_rows(aggregate(kept_of(events[:cut]), index, always).usage)
    b = usage_rows(aggregate(kept_of(events[cut:]), index, always).usage)
    assert merge_rows(a + b) == merge_rows(whole)


def test_usage_table_round_trip_keeps_decimals_exact() -> None:
    row = (
        "t1",
        "m",
        "c1",
        T0,
        '{"r":"eu"}',
        "s",
        {"r": "eu"},
        3,
        2,
        Decimal("12345678901234567890.123456789"),
        Decimal("-0.000000001"),
        None,
        ["a", "b"],
        (T0 + 5, "e1", Decimal("7.25")),
        0,
    )
    (back,) = usage_rows(usage_table([row]))
    assert back.value_sum == Decimal("12345678901234567890.123456789")
    assert back.value_min == Decimal("-0.000000001")
    assert back.value_max is None
    assert back.latest == (T0 + 5, "e1", Decimal("7.25"))
    assert back.group_values == {"r": "eu"}
    assert int(back.window_start.timestamp() * 1000) == T0
