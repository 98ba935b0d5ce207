from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.envelope import EnvelopeEvent
from schemas.meters import Aggregation
from schemas.timeutil import epoch_ms
from streams.aggregation import (
    AGGREGATORS,
    NO_LATEST,
    MinuteAggregate,
    WindowTable,
    merge_rows,
    window_start_ms,
)
from streams.matching import CompiledMeter
from tests.unit.streams.fakes import meter

ING = 1_700_000_000_000
T0 = 1_700_000_040_000  # 2023-11-14T22:14:00Z, a minute boundary


def contribution(cm: CompiledMeter, props: dict, t: int = T0, id_: str = "e"):  # type: ignore[no-untyped-def]
    c = cm.match(EnvelopeEvent(id_, "api", "c1", t, props))
    assert c is not None
    return c


def value_of(kind: str, values: list[object]) -> Decimal | None:
    cm = CompiledMeter(meter(aggregation=kind, value_property=None if kind == "count" else "$.v"))
    agg = AGGREGATORS[Aggregation(kind)]
    state = agg.initialize()
    for i, v in enumerate(values):
        agg.add(state, contribution(cm, {"v": v}, T0 + i, f"e{i}"), T0 + i, f"e{i}")
    return agg.result(state)


def test_count() -> None:
    assert value_of("count", [1, "x", None]) == 3
    assert value_of("count", []) == 0


def test_sum() -> None:
    assert value_of("sum", [1, "2.5", 0.1]) == Decimal("3.6")
    assert value_of("sum", []) == 0


def test_avg() -> None:
    assert value_of("avg", [1, 2, 4]) == Context(prec=80).divide(Decimal(7), Decimal(3))
    assert value_of("avg", []) is None


def test_min_max() -> None:
    assert value_of("min", [3, -1, 2]) == -1
    assert value_of("max", [3, -1, 2]) == 3
    assert value_of("min", []) is None
    assert value_of("max", []) is None


def test_unique_count() -> None:
    assert value_of("unique_count", ["a", "b", "a", 1, 1.0, "1"]) == 3


def test_latest_by_time_then_id() -> None:
    cm = CompiledMeter(meter(aggregation="latest", value_property="$.v"))
    agg = AGGREGATORS[Aggregation.LATEST]
    st_ = agg.initialize()
    agg.add(st_, contribution(cm, {"v": 5}, T0 + 10, "b"), T0 + 10, "b")
    agg.add(st_, contribution(cm, {"v": 7}, T0 + 20, "a"), T0 + 20, "a")
    agg.add(st_, contribution(cm, {"v": 1}, T0 + 5, "z"), T0 + 5, "z")  # older: ignored
    assert agg.result(st_) == 7
    agg.add(st_, contribution(cm, {"v": 9}, T0 + 20, "b"), T0 + 20, "b")  # same ms, higher id
    assert agg.result(st_) == 9


def test_big_sums_are_exact() -> None:
    big = "9999999999999999999.999999999"  # the largest meter value (below VALUE_LIMIT)
    assert value_of("sum", [big, big, big]) == Decimal("29999999999999999999.999999997")


def test_window_assignment_floors_to_utc_minute() -> None:
    assert window_start_ms(T0) == T0
    assert window_start_ms(T0 + 59_999) == T0
    assert window_start_ms(T0 + 60_000) == T0 + 60_000
    assert window_start_ms(T0 - 1) == T0 - 60_000
    assert window_start_ms(-1) == -60_000  # before 1970 still floors


def test_dst_change_does_not_move_windows() -> None:
    # Europe/Berlin springs forward at 2024-03-31 01:00 UTC (02:00 local -> 03:00 local).
    berlin = ZoneInfo("Europe/Berlin")
    before = datetime(2024, 3, 31, 1, 59, 30, tzinfo=berlin)  # 00:59:30 UTC
    after = datetime(2024, 3, 31, 3, 0, 30, tzinfo=berlin)  # 01:00:30 UTC
    assert after.astimezone(UTC) - before.astimezone(UTC) == timedelta(minutes=1)
    wb = window_start_ms(epoch_ms(before))
    wa = window_start_ms(epoch_ms(after))
    assert wa - wb == 60_000
    assert datetime.fromtimestamp(wb / 1000, UTC) == datetime(2024, 3, 31, 0, 59, tzinfo=UTC)
    assert datetime.fromtimestamp(wa / 1000, UTC) == datetime(2024, 3, 31, 1, 0, tzinfo=UTC)
    # fall back: the repeated local hour 02:00-03:00 maps to two distinct UTC hours
    first = datetime(2024, 10, 27, 2, 30, tzinfo=berlin, fold=0)
    second = datetime(2024, 10, 27, 2, 30, tzinfo=berlin, fold=1)
    assert window_start_ms(epoch_ms(second)) - window_start_ms(epoch_ms(first)) == 3_600_000


def test_window_table_rows() -> None:
    cm = CompiledMeter(
        meter(aggregation="sum", value_property="$.v", group_by={"r": "$.r"}, meter_id="M")
    )
    wt = WindowTable()
    for t, v, r in [(T0, 1, "eu"), (T0 + 30_000, 2, "eu"), (T0 + 61_000, 4, "eu"), (T0, 8, "us")]:
        wt.add("t1", "c1", t, f"id{t}{r}", contribution(cm, {"v": v, "r": r}, t))
    rows = sorted(wt.rows(), key=lambda r: (r[3], r[4]))
    assert len(rows) == 3
    r0 = rows[0]
    assert r0[:6] == (
        "t1",
        "M",
        "c1",
        datetime.fromtimestamp(T0 / 1000, UTC),
        '{"r":"eu"}',
        "s",
    )
    assert r0[6] == {"r": "eu"}
    assert r0[7:12] == (2, 2, Decimal(3), Decimal(1), Decimal(2))
    assert r0[12] == []
    assert r0[13] == NO_LATEST
    assert r0[14] == 0
    assert rows[2][3] == datetime.fromtimestamp((T0 + 60_000) / 1000, UTC)
    assert rows[2][9] == 4


# --- invariants ------------------------------------------------------------------------------

events_st = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=5 * 60_000),  # time offset
        st.sampled_from(["a", "b", "c"]),  # group
        st.decimals(min_value=-1000, max_value=1000, places=3, allow_nan=False),
        st.sampled_from(["c1", "c2"]),  # customer
    ),
    max_size=60,
)


def _table(kind: str, evs: list[tuple[int, str, Decimal, str]], first: int = 0) -> WindowTable:
    cm = CompiledMeter(
        meter(
            aggregation=kind,
            value_property=None if kind == "count" else "$.v",
            group_by={"g": "$.g"},
        )
    )
    wt = WindowTable()
    for i, (dt, g, v, cust) in enumerate(evs, start=first):
        t = T0 + dt
        c = cm.match(EnvelopeEvent(f"e{i}", "api", cust, t, {"v": str(v), "g": g}))
        assert c is not None
        wt.add("t1", cust, t, f"e{i}", c)
    return wt


def _norm(merged: dict) -> dict:  # type: ignore[type-arg]
    return {
        k: (a.events, a.value_count, a.value_sum, a.value_min, a.value_max, a.uniq, a.latest)
        for k, a in merged.items()
    }


@settings(max_examples=60)
@given(events_st, st.integers(min_value=0, max_value=60), st.sampled_from(list(Aggregation)))
def test_split_stream_merges_to_whole(evs, cut, kind) -> None:  # type: ignore[no-untyped-def]
    cut = min(cut, len(evs))
    whole = merge_rows(_table(kind, evs).rows())
    parts = merge_rows(_table(kind, evs[:cut]).rows() + _table(kind, evs[cut:], cut).rows())
    assert _norm(parts) == _norm(whole)
    # and the meter value read from each window agrees with a direct computation
    agg = AGGREGATORS[Aggregation(kind)]
    for key, state in whole.items():
        _, _, cust, g, wms = key
        vals = [
            (T0 + dt, f"e{i}", v.quantize(Decimal("0.000000001")))
            for i, (dt, gg, v, c) in enumerate(evs)
            if c == cust and f'{{"g":"{gg}"}}' == g and window_start_ms(T0 + dt) == wms
        ]
        direct = {
            Aggregation.COUNT: Decimal(len(vals)),
            Aggregation.SUM: sum((v for _, _, v in vals), Decimal(0)),
            Aggregation.MIN: min(v for _, _, v in vals),
            Aggregation.MAX: max(v for _, _, v in vals),
            Aggregation.AVG: sum((v for _, _, v in vals), Decimal(0)) / len(vals),
            Aggregation.UNIQUE_COUNT: Decimal(
                len({format(v.normalize(), "f") for _, _, v in vals})
            ),
            Aggregation.LATEST: max(vals)[2],
        }[Aggregation(kind)]
        got = agg.result(state)
        assert got is not None
        if kind == "avg":
            assert abs(got - direct) < Decimal("1e-20")
        elif kind == "unique_count":
            assert got == Decimal(len(state.uniq))
        else:
            assert got == direct


@settings(max_examples=60)
@given(events_st, st.randoms(use_true_random=False), st.sampled_from(list(Aggregation)))
def test_order_independent(evs, rnd, kind) -> None:  # type: ignore[no-untyped-def]
    ids = list(enumerate(evs))
    shuffled = ids[:]
    rnd.shuffle(shuffled)

    def build(seq):  # type: ignore[no-untyped-def]
        cm = CompiledMeter(
            meter(aggregation=kind, value_property=None if kind == "count" else "$.v")
        )
        wt = WindowTable()
        for i, (dt, _g, v, cust) in seq:
            t = T0 + dt
            c = cm.match(EnvelopeEvent(f"e{i}", "api", cust, t, {"v": str(v)}))
            wt.add("t1", cust, t, f"e{i}", c)
        return _norm(merge_rows(wt.rows()))

    assert build(ids) == build(shuffled)


@given(
    st.lists(
        st.decimals(min_value=-(10**6), max_value=10**6, places=2, allow_nan=False), max_size=30
    )
)
def test_merge_is_associative_and_has_identity(vals: list[Decimal]) -> None:
    def agg(vs: list[Decimal]) -> MinuteAggregate:
        a = MinuteAggregate()
        for v in vs:
            a.add(v, str(v), (int(v), "x"))
        return a

    n = len(vals)
    a, b, c = agg(vals[: n // 3]), agg(vals[n // 3 : 2 * n // 3]), agg(vals[2 * n // 3 :])
    left = agg([]).merge(a).merge(b).merge(c)
    right = agg([]).merge(a).merge(agg([]).merge(b).merge(c))
    assert left == right == agg(vals)
    assert MinuteAggregate().merge(agg(vals)) == agg(vals)
