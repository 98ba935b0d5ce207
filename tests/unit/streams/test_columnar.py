"""The columnar matching + aggregation (streams.columnar) equals the per-event reference
(``CompiledMeter.match`` + ``WindowTable``, the worker's previous hot path) on random batches."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.columns import usage_rows, usage_table
from schemas.envelope import EnvelopeEvent
from schemas.meters import Meter
from streams.aggregation import WindowTable, merge_rows
from streams.columnar import KeptEvents, aggregate, aggregate_links
from streams.matching import VALUE_LIMIT, CompiledMeter, MeterIndex, ValueProblem
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


def _columns(events: list[tuple[Any, ...]]) -> KeptEvents:
    """Every event of ``events`` in the columns (``positions`` None: all kept)."""
    kept = KeptEvents()
    for tenant, eid, etype, customer, t, p, offset in events:
        kept.tenants.append(tenant)
        kept.ids.append(eid)
        kept.types.append(etype)
        kept.customers.append(customer)
        kept.times_ms.append(t)
        kept.properties.append(p)
        kept.offsets.append(offset)
    return kept


def _first_copies(events: list[tuple[Any, ...]]) -> list[int]:
    """The positions of the first copy of each (tenant, id): the link keeps one copy of an id
    (dedupe runs before)."""
    seen: set[tuple[str, str]] = set()
    out: list[int] = []
    for n, (tenant, eid, *_rest) in enumerate(events):
        if (tenant, eid) not in seen:
            seen.add((tenant, eid))
            out.append(n)
    return out


def _kept(events: list[tuple[Any, ...]]) -> KeptEvents:
    return _columns([events[n] for n in _first_copies(events)])


def _check(events: list[tuple[Any, ...]], meters: list[Meter], markers: list[int | None]) -> None:
    index = MeterIndex(meters)
    by_id = {m.id: markers[n] for n, m in enumerate(meters)}

    def threshold(cm: CompiledMeter) -> int | None:
        return -1 if cm.activation_topic == "" else by_id[cm.id]

    kept = _kept(events)
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
    assert all(r[12] == sorted(r[12]) for r in got_rows)  # unique values in sorted order
    # the issues name the kept event and the meter, with the reference's message
    for issue in got.issues:
        j = issue.event
        ev = EnvelopeEvent(
            kept.ids[j], kept.types[j], kept.customers[j], kept.times_ms[j], kept.properties[j]
        )
        with pytest.raises(ValueProblem) as exc:
            index.by_id[issue.meter_id].match(ev)
        assert str(exc.value) == issue.message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(event, min_size=10, max_size=80),
    specs=st.lists(meter_spec, min_size=1, max_size=6),
    markers=st.lists(st.one_of(st.none(), st.integers(-1, 20)), min_size=6, max_size=6),
)
def test_columnar_equals_the_per_event_reference(
    events: list[tuple[Any, ...]], specs: list[tuple[Any, ...]], markers: list[int | None]
) -> None:
    _check(events, [_meter(n, *spec) for n, spec in enumerate(specs)], markers)


def _every_copy(events: list[tuple[Any, ...]]) -> KeptEvents:
    """``events`` as the worker hands a link to the aggregation: every copy in the columns,
    the first copy of each (tenant, id) at ``positions``."""
    link = _columns(events)
    link.positions = _first_copies(events)
    return link


def _same_result(got: Any, want: Any, positions: list[int] | None) -> None:
    """Two aggregations agree: the same windows, and the same issues once ``got``'s positions
    in the columns are read as kept events (``positions``)."""
    assert merge_rows(usage_rows(got.usage)) == merge_rows(usage_rows(want.usage))
    assert got.usage.num_rows == want.usage.num_rows == got.windows
    kept_of = (lambda j: j) if positions is None else positions.index
    assert sorted((kept_of(i.event), i.meter_id, i.message) for i in got.issues) == sorted(
        want.issues
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(event, max_size=60),
    specs=st.lists(meter_spec, min_size=1, max_size=6),
    markers=st.lists(st.one_of(st.none(), st.integers(-1, 20)), min_size=6, max_size=6),
    cut=st.integers(0, 60),
)
def test_kept_positions_aggregate_as_the_kept_columns(
    events: list[tuple[Any, ...]],
    specs: list[tuple[Any, ...]],
    markers: list[int | None],
    cut: int,
) -> None:
    """A link whose columns hold the dropped copies too, its kept events at ``positions``,
    aggregates to the windows and issues of its kept events alone (``_kept``), one link or
    several at once (the copies may differ in type, customer, time and properties: only the
    first counts)."""
    meters = [_meter(n, *spec) for n, spec in enumerate(specs)]
    index = MeterIndex(meters)
    by_id = {m.id: markers[n] for n, m in enumerate(meters)}

    def threshold(cm: CompiledMeter) -> int | None:
        return -1 if cm.activation_topic == "" else by_id[cm.id]

    link = _every_copy(events)
    _same_result(
        aggregate(link, index, threshold),
        aggregate(_kept(events), index, threshold),
        link.positions,
    )
    parts = [events[:cut], events[cut:]]
    links = [_every_copy(part) for part in parts]
    results = aggregate_links([(k, threshold) for k in links], index)
    for part, k, result in zip(parts, links, results, strict=True):
        _same_result(result, aggregate(_kept(part), index, threshold), k.positions)
    mixed = aggregate_links([(links[0], threshold), (_kept(parts[1]), threshold)], index)
    _same_result(mixed[0], aggregate(_kept(parts[0]), index, threshold), links[0].positions)
    _same_result(mixed[1], aggregate(_kept(parts[1]), index, threshold), None)


# Columns of one JSON type (what the native paths take: integers, strings, bools; nulls and
# missing values among them), integers up to the int64 limits and decimals around VALUE_LIMIT
# (sums past int64; values just below the limit, at it and far past it).
_BIG = int(VALUE_LIMIT) - 1
typed_props = st.fixed_dictionaries(
    {
        "v": st.one_of(
            st.integers(-5, 5),
            st.integers(-(2**63), 2**63 - 1),
            st.sampled_from([2**63 - 1, -(2**63), 2**62, 0]),
        ),
    },
    optional={
        "region": st.sampled_from(["eu", "us", "ap", "", None]),
        "user": st.sampled_from(["u1", "u2", "u3", "é", "z"]),
        "n": st.sampled_from([1, 2, -3, 2**63 - 1]),
        "flag": st.booleans(),
        "o": st.fixed_dictionaries({"v": st.integers(-3, 3)}),
        "big": st.one_of(
            st.sampled_from([_BIG, -_BIG, _BIG + 1, 6 * 10**28, -(6 * 10**28), 1]),
            st.sampled_from([str(_BIG) + ".999999999", str(_BIG) + ".9999999995", "-4.5e18"]),
            st.sampled_from(["0.000000001", "1e19", "-9.99e28"]),
        ),
    },
)
typed_event = st.tuples(
    st.just("t1"),
    st.sampled_from([f"e{n}" for n in range(40)]),
    st.just("api"),
    st.sampled_from(["c1", "c2", "c3"]),
    st.one_of(st.integers(-90_000, 90_000), st.sampled_from([0, 1, 59_999])).map(lambda d: T0 + d),
    typed_props,
    st.integers(0, 20),
)
_FILTERS: list[dict[str, Any]] = [
    {"property": "$.region", "op": "eq", "value": "eu"},
    {"property": "$.region", "op": "eq", "value": 1},
    {"property": "$.region", "op": "eq", "value": None},
    {"property": "$.region", "op": "ne", "value": "eu"},
    {"property": "$.region", "op": "in", "value": ["us", 1, ""]},
    {"property": "$.region", "op": "in", "value": ["us", None]},
    {"property": "$.region", "op": "nin", "value": ["eu"]},
    {"property": "$.region", "op": "exists"},
    {"property": "$.region", "op": "exists", "value": False},
    {"property": "$.v", "op": "gt", "value": 0},
    {"property": "$.v", "op": "gte", "value": -1.5},
    {"property": "$.v", "op": "lt", "value": "2.5"},
    {"property": "$.v", "op": "lte", "value": 2**63},
    {"property": "$.v", "op": "lte", "value": 2.5},
    {"property": "$.o.v", "op": "gt", "value": 1},
    {"property": "$.n", "op": "eq", "value": 2},
    {"property": "$.flag", "op": "eq", "value": True},
    {"property": "$.user", "op": "ne", "value": "u1"},
]
typed_meter = st.tuples(
    st.sampled_from(["count", "sum", "min", "max", "avg", "unique_count", "latest"]),
    st.sampled_from(["$.v", "$.big", "$.user", "$.n", "$.flag", "$.region"]),
    st.sampled_from(
        [{}, {"region": "$.region"}, {"flag": "$.flag", "r": "$.region"}, {"n": "$.n"}]
    ),
    st.lists(st.sampled_from(_FILTERS), max_size=2),
    st.sampled_from(["", "tally.events"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(typed_event, min_size=5, max_size=80),
    specs=st.lists(typed_meter, min_size=1, max_size=5),
    markers=st.lists(st.one_of(st.none(), st.integers(-1, 20)), min_size=5, max_size=5),
)
def test_typed_columns_equal_the_per_event_reference(
    events: list[tuple[Any, ...]], specs: list[tuple[Any, ...]], markers: list[int | None]
) -> None:
    meters = [
        meter(
            f"m{n}",
            meter_id=f"id-{n}",
            tenant_id="t1",
            event_type="api",
            aggregation=agg,
            value_property=None if agg == "count" else path,
            group_by=group,
            filters=filters,
            activation_topic=topic,
        )
        for n, (agg, path, group, filters, topic) in enumerate(specs)
    ]
    _check(events, meters, markers)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    links=st.lists(st.lists(st.one_of(event, typed_event), max_size=40), min_size=1, max_size=4),
    specs=st.lists(meter_spec, min_size=1, max_size=5),
    markers=st.lists(
        st.lists(st.one_of(st.none(), st.integers(-1, 20)), min_size=5, max_size=5),
        min_size=4,
        max_size=4,
    ),
)
def test_links_aggregated_together_equal_one_call_per_link(
    links: list[list[tuple[Any, ...]]],
    specs: list[tuple[Any, ...]],
    markers: list[list[int | None]],
) -> None:
    """``aggregate_links`` (one call for a flush's links, the worker's path) gives every link
    exactly the rows, issues and counts of ``aggregate`` on that link alone (each link with its
    own thresholds: activation markers differ by partition)."""
    meters = [_meter(n, *spec) for n, spec in enumerate(specs)]
    index = MeterIndex(meters)

    def threshold_of(k: int) -> Any:
        by_id = {m.id: markers[k][n] for n, m in enumerate(meters)}

        def threshold(cm: CompiledMeter) -> int | None:
            return -1 if cm.activation_topic == "" else by_id[cm.id]

        return threshold

    kepts = [_kept(evs) for evs in links]
    alone = [aggregate(kept, index, threshold_of(k)) for k, kept in enumerate(kepts)]
    together = aggregate_links([(kept, threshold_of(k)) for k, kept in enumerate(kepts)], index)
    assert len(together) == len(kepts)
    for one, joint in zip(alone, together, strict=True):
        assert sorted(usage_rows(joint.usage)) == sorted(usage_rows(one.usage))
        assert joint.usage.schema == one.usage.schema
        assert sorted(joint.issues) == sorted(one.issues)
        assert joint.windows == one.windows == joint.usage.num_rows


def test_int64_sums_past_the_int64_range_stay_exact() -> None:
    events = [("t1", f"e{n}", "api", "c1", T0 + n, {"v": 2**63 - 1 - n}, 0) for n in range(4)] + [
        ("t1", "e9", "api", "c1", T0 + 9, {"v": 2**63 - 1}, 0)
    ]
    meters = [meter("s", meter_id="id-s", aggregation="sum", value_property="$.v")]
    _check(events, meters, [None])
    (row,) = usage_rows(aggregate(_kept(events), MeterIndex(meters), lambda cm: -1).usage)
    assert row.value_sum == Decimal(5 * (2**63 - 1) - 6)


def test_values_past_the_meter_limit_are_issues_and_window_sums_stay_in_range() -> None:
    """A value at or past VALUE_LIMIT is a value issue of that event (it does not feed the meter); the
    largest values sum past int64 and stay exact. Before the limit, two events of 6e28 in one
    window made the whole link fail (and stalled its partition for every tenant on it)."""
    top = int(VALUE_LIMIT) - 1
    values: list[Any] = [6 * 10**28, 10**19, "1e19", top, -top, top, str(top) + ".999999999"]
    events = [("t1", f"e{n}", "api", "c1", T0, {"v": v}, 0) for n, v in enumerate(values)]
    meters = [meter("s", meter_id="id-s", aggregation="sum", value_property="$.v")]
    _check(events, meters, [None])
    got = aggregate(_kept(events), MeterIndex(meters), lambda cm: -1)
    (row,) = usage_rows(got.usage)
    assert row.events == row.value_count == 4
    assert row.value_sum == Decimal("19999999999999999998.999999999")  # past int64
    assert sorted(i.event for i in got.issues) == [0, 1, 2]
    assert all("below 1e19" in i.message for i in got.issues)


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


def test_a_column_arrow_cannot_read_is_filtered_per_event() -> None:
    """A lone surrogate (no UTF-8 form) in a filtered property: the filter runs per event."""
    events = [
        ("t1", "e1", "api", "c1", T0, {"region": "\ud800"}, 0),
        ("t1", "e2", "api", "c1", T0, {"region": "eu"}, 0),
        ("t1", "e3", "api", "c1", T0, {"region": "us"}, 0),
    ]
    filters = [{"property": "$.region", "op": "ne", "value": "us"}]
    meters = [meter("c", meter_id="id-c", filters=filters)]
    _check(events, meters, [None])
    (row,) = usage_rows(aggregate(_kept(events), MeterIndex(meters), lambda cm: -1).usage)
    assert row.events == 2
