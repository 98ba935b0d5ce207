from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.envelope import EnvelopeEvent
from streams.matching import (
    MAX_ABS,
    VALUE_LIMIT,
    CompiledMeter,
    MeterIndex,
    ValueProblem,
    canonical_scalar,
    group_key_of,
    to_decimal,
)
from tests.unit.streams.fakes import meter

ING = 1_700_000_000_000


def ev(props: dict[str, Any], type_: str = "api", id_: str = "e1") -> EnvelopeEvent:
    return EnvelopeEvent(id_, type_, "cust", 1_700_000_000_000, props)


def matches(flt: dict[str, Any], props: dict[str, Any]) -> bool:
    cm = CompiledMeter(meter(filters=[flt]))
    return cm.match(ev(props)) is not None


@pytest.mark.parametrize(
    ("flt", "props", "expected"),
    [
        ({"property": "$.r", "op": "eq", "value": "eu"}, {"r": "eu"}, True),
        ({"property": "$.r", "op": "eq", "value": "eu"}, {"r": "us"}, False),
        ({"property": "$.r", "op": "eq", "value": "eu"}, {}, False),
        ({"property": "$.n", "op": "eq", "value": 1}, {"n": 1.0}, True),
        ({"property": "$.n", "op": "eq", "value": 1}, {"n": True}, False),
        ({"property": "$.n", "op": "eq", "value": 1}, {"n": "1"}, False),
        ({"property": "$.b", "op": "eq", "value": True}, {"b": True}, True),
        ({"property": "$.r", "op": "ne", "value": "eu"}, {"r": "us"}, True),
        ({"property": "$.r", "op": "ne", "value": "eu"}, {"r": "eu"}, False),
        ({"property": "$.r", "op": "ne", "value": "eu"}, {}, True),
        ({"property": "$.r", "op": "in", "value": ["eu", "us"]}, {"r": "us"}, True),
        ({"property": "$.r", "op": "in", "value": ["eu", "us"]}, {"r": "ap"}, False),
        ({"property": "$.r", "op": "in", "value": [1, 2]}, {"r": 2.0}, True),
        ({"property": "$.r", "op": "in", "value": ["eu"]}, {}, False),
        ({"property": "$.r", "op": "nin", "value": ["eu", "us"]}, {"r": "ap"}, True),
        ({"property": "$.r", "op": "nin", "value": ["eu", "us"]}, {"r": "eu"}, False),
        ({"property": "$.r", "op": "nin", "value": ["eu"]}, {}, True),
        ({"property": "$.n", "op": "gt", "value": 10}, {"n": 10.5}, True),
        ({"property": "$.n", "op": "gt", "value": 10}, {"n": 10}, False),
        ({"property": "$.n", "op": "gt", "value": 10}, {"n": "11"}, True),
        ({"property": "$.n", "op": "gt", "value": 10}, {"n": "abc"}, False),
        ({"property": "$.n", "op": "gt", "value": 10}, {"n": True}, False),
        ({"property": "$.n", "op": "gt", "value": 10}, {}, False),
        ({"property": "$.n", "op": "gte", "value": 10}, {"n": 10}, True),
        ({"property": "$.n", "op": "gte", "value": 10}, {"n": 9.999}, False),
        ({"property": "$.n", "op": "lt", "value": "0.1"}, {"n": 0.09}, True),
        ({"property": "$.n", "op": "lt", "value": "0.1"}, {"n": 0.1}, False),
        ({"property": "$.n", "op": "lte", "value": "0.1"}, {"n": 0.1}, True),
        ({"property": "$.n", "op": "lte", "value": "0.1"}, {"n": 0.2}, False),
        ({"property": "$.a.b", "op": "exists"}, {"a": {"b": 0}}, True),
        ({"property": "$.a.b", "op": "exists"}, {"a": {}}, False),
        ({"property": "$.a.b", "op": "exists"}, {"a": {"b": None}}, False),
        ({"property": "$.a.b", "op": "exists", "value": False}, {"a": {}}, True),
        ({"property": "$.a.b", "op": "exists", "value": False}, {"a": {"b": 1}}, False),
        ({"property": "$.l[1]", "op": "eq", "value": "x"}, {"l": ["w", "x"]}, True),
    ],
)
def test_filter_ops(flt: dict[str, Any], props: dict[str, Any], expected: bool) -> None:
    assert matches(flt, props) is expected


def test_all_filters_must_pass() -> None:
    cm = CompiledMeter(
        meter(
            filters=[
                {"property": "$.r", "op": "eq", "value": "eu"},
                {"property": "$.n", "op": "gt", "value": 1},
            ]
        )
    )
    assert cm.match(ev({"r": "eu", "n": 2})) is not None
    assert cm.match(ev({"r": "eu", "n": 0})) is None
    assert cm.match(ev({"r": "us", "n": 2})) is None


def test_event_type_must_equal() -> None:
    cm = CompiledMeter(meter(event_type="api"))
    assert cm.match(ev({}, type_="api")) is not None
    assert cm.match(ev({}, type_="API")) is None


def test_created_at_does_not_decide_where_a_meter_applies() -> None:
    # The position of the meter's activation marker decides (streams.activation), not clocks:
    # an event whose time and ingestion are long before created_at still matches.
    cm = CompiledMeter(meter(created_at=datetime(2030, 1, 1, tzinfo=UTC)))
    assert cm.match(ev({})) is not None
    assert cm.activation_topic == ""


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (3, Decimal("3")),
        (2.5, Decimal("2.5")),
        (0.1, Decimal("0.1")),
        ("12.75", Decimal("12.75")),
        (" 7 ", Decimal("7")),
        ("1e3", Decimal("1000")),
        ("0.0000000004", Decimal("0")),
        ("0.0000000006", Decimal("0.000000001")),
        (-4, Decimal("-4")),
    ],
)
def test_value_parsing(raw: Any, expected: Decimal) -> None:
    cm = CompiledMeter(meter(aggregation="sum", value_property="$.v"))
    c = cm.match(ev({"v": raw}))
    assert c is not None
    assert c.value == expected


@pytest.mark.parametrize(
    "raw",
    [True, False, None, "abc", "NaN", "inf", "-Infinity", float("nan"), [1], {"a": 1}, "1e40"],
)
def test_value_rejected(raw: Any) -> None:
    cm = CompiledMeter(meter(aggregation="sum", value_property="$.v"))
    with pytest.raises(ValueProblem):
        cm.match(ev({"v": raw}))


def test_missing_value_is_a_problem_but_count_needs_none() -> None:
    with pytest.raises(ValueProblem):
        CompiledMeter(meter(aggregation="max", value_property="$.v")).match(ev({}))
    c = CompiledMeter(meter(aggregation="count")).match(ev({}))
    assert c is not None
    assert c.value is None
    assert c.uniq is None


def test_unique_count_canonical_strings() -> None:
    cm = CompiledMeter(meter(aggregation="unique_count", value_property="$.u"))

    def u(v: Any) -> str | None:
        c = cm.match(ev({"u": v}))
        return None if c is None else c.uniq

    assert u("abc") == "abc"
    assert u(5) == "5"
    assert u(5.0) == "5"
    assert u(2.50) == "2.5"
    assert u(True) == "true"
    assert u("5") == "5"
    with pytest.raises(ValueProblem):
        u(None)
    with pytest.raises(ValueProblem):
        u({"a": 1})


def test_group_by_values_and_key() -> None:
    cm = CompiledMeter(
        meter(group_by={"region": "$.r", "tier": "$.t", "n": "$.n", "obj": "$.o", "f": "$.f"})
    )
    c = cm.match(ev({"r": "eu", "n": 3, "o": {"b": 1, "a": [1]}, "f": False}))
    assert c is not None
    assert c.group_values == {
        "region": "eu",
        "tier": "",
        "n": "3",
        "obj": '{"a":[1],"b":1}',
        "f": "false",
    }
    assert c.group_key == group_key_of(c.group_values)
    assert c.group_key.startswith('{"f":"false","n":"3"')


def test_no_group_by_gives_empty_key() -> None:
    c = CompiledMeter(meter()).match(ev({"r": "eu"}))
    assert c is not None
    assert c.group_key == ""
    assert c.group_values == {}


def test_index_by_tenant_and_type() -> None:
    m1 = meter("a", tenant_id="t1", event_type="api")
    m2 = meter("b", tenant_id="t1", event_type="api", meter_id="id-b")
    m3 = meter("c", tenant_id="t2", event_type="api", meter_id="id-c")
    m4 = meter("d", tenant_id="t1", event_type="job", meter_id="id-d")
    idx = MeterIndex([m1, m2, m3, m4])
    assert {c.id for c in idx.candidates("t1", "api")} == {"id-a", "id-b"}
    assert [c.id for c in idx.candidates("t2", "api")] == ["id-c"]
    assert idx.candidates("t3", "api") == []
    again = MeterIndex([m1, m2], previous=idx)
    assert again.by_id["id-a"] is idx.by_id["id-a"]  # compiled once


@given(st.integers(min_value=-(10**20), max_value=10**20), st.integers(0, 9))
def test_to_decimal_round_trips_decimal_strings(n: int, scale: int) -> None:
    d = Decimal(n).scaleb(-scale)
    assert to_decimal(str(d)) == d
    assert to_decimal(format(d, "f")) == d


@given(st.one_of(st.integers(), st.text(), st.booleans()))
def test_canonical_scalar_is_stable(v: Any) -> None:
    assert canonical_scalar(v) == canonical_scalar(v)
    assert isinstance(canonical_scalar(v), str)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (10**29 - 1, True),  # 29 nines: abs() at 28 digits would round it up to 10**29
        ("99999999999999999999999999999.999999999", True),
        (-(10**29) + 1, True),
        (10**29, False),
        ("99999999999999999999999999999.9999999995", False),  # the quantum rounds it to 10**29
    ],
)
def test_to_decimal_range_is_decimal_38_9(value: object, ok: bool) -> None:
    if ok:
        d = to_decimal(value)
        assert d.copy_abs() < MAX_ABS and d == Decimal(str(value))
    else:
        with pytest.raises(ValueProblem, match="out of range"):
            to_decimal(value)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (10**19 - 1, True),
        (2**63 - 1, True),  # every int64 is in range
        ("9999999999999999999.999999999", True),
        (-(10**19) + 1, True),
        (10**19, False),
        ("1e19", False),
        ("9999999999999999999.9999999995", False),  # the quantum rounds it to 10**19
        (6 * 10**28, False),  # in Decimal(38, 9), but two of them would not sum in it
    ],
)
def test_meter_values_stay_below_value_limit(value: object, ok: bool) -> None:
    cm = CompiledMeter(meter(aggregation="sum", value_property="$.v"))
    if ok:
        c = cm.match(ev({"v": value}))
        assert c is not None and c.value == Decimal(str(value))
        assert c.value.copy_abs() < VALUE_LIMIT
    else:
        with pytest.raises(ValueProblem, match="below 1e19 in magnitude"):
            cm.match(ev({"v": value}))


def test_filters_compare_numbers_past_value_limit() -> None:
    """The value limit is the meter value's: a filter still compares any Decimal(38, 9) number."""
    assert matches({"property": "$.n", "op": "gt", "value": 10**20}, {"n": 6 * 10**28})
    assert not matches({"property": "$.n", "op": "lt", "value": 10**20}, {"n": 6 * 10**28})
    assert matches({"property": "$.n", "op": "eq", "value": 10**25}, {"n": 1e25})
