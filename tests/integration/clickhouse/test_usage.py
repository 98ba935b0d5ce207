"""Usage queries on real chDB vs a ground truth computed from the raw events."""

from __future__ import annotations

import itertools
import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clickhouse.repo import Repo
from clickhouse.sink import ClickHouseSink
from clickhouse.usage import run_usage
from schemas.meters import Aggregation, Meter, MeterSpec
from schemas.usage import UsageQuery, WindowSize
from tests.integration.clickhouse.groundtruth import Ev, delta_rows, ground_truth

GROUPS = {"region": "$.region", "tier": "$.tier"}


def _meter(repo: Repo, tenant_id: str, aggregation: Aggregation, slug: str) -> Meter:
    spec = MeterSpec(
        slug=slug,
        event_type="api_call",
        aggregation=aggregation,
        value_property=None if aggregation == Aggregation.COUNT else "$.v",
        group_by=GROUPS,
    )
    return repo.create_meter(tenant_id, spec)


def _events(rng: random.Random, start: datetime, minutes: int, n: int) -> list[Ev]:
    out = []
    for i in range(n):
        m = rng.randrange(minutes)
        # coarse seconds => many equal timestamps, so `latest` ties are decided by the event id
        t = start + timedelta(minutes=m, seconds=rng.choice([0, 30]))
        dims = {"region": rng.choice(["eu", "us"])}
        if rng.random() < 0.7:
            dims["tier"] = rng.choice(["a", "b"])
        value = Decimal(rng.randrange(-5000, 50000)) / Decimal(rng.choice([1, 100, 1000]))
        out.append(
            Ev(f"ev{rng.randrange(10**9):09d}-{i}", rng.choice(["c1", "c2", "c3"]), t, value, dims)
        )
    return out


def _store_events(
    sink: ClickHouseSink, tenant_id: str, meter: Meter, events: list[Ev], flushes: int
) -> None:
    """Store the events as the deltas of several flushes (several rows per minute and group)."""
    size = max(1, len(events) // flushes)
    for i in range(0, len(events), size):
        sink.commit("t", [], delta_rows(tenant_id, meter.id, events[i : i + size]), {0: i})


def _actual(rows: list) -> list[tuple]:
    return [(r.window_start, r.window_end, r.customer, r.group_by, r.value) for r in rows]


@pytest.fixture
def tenant(store: object) -> tuple[Repo, ClickHouseSink, str, str]:
    repo = Repo(store)  # type: ignore[arg-type]
    t, _ = repo.create_tenant("acme")
    other, _ = repo.create_tenant("other")
    return repo, ClickHouseSink(store), t.tenant_id, other.tenant_id  # type: ignore[arg-type]


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_every_aggregation_matches_ground_truth(tenant, aggregation: Aggregation) -> None:
    repo, sink, tid, other = tenant
    rng = random.Random(hash(aggregation.value) & 0xFFFF)
    start = datetime(2024, 3, 30, 20, 0, tzinfo=UTC)
    events = _events(rng, start, 24 * 60, 600)
    meter = _meter(repo, tid, aggregation, "m")
    _store_events(sink, tid, meter, events, flushes=4)
    # noise: another meter of the same tenant and the same slug in another tenant
    noise = _events(rng, start, 24 * 60, 100)
    _store_events(sink, tid, _meter(repo, tid, aggregation, "other-meter"), noise, 1)
    _store_events(sink, other, _meter(repo, other, aggregation, "m"), noise, 1)

    cases = [
        dict(window=None, group_by=()),
        dict(window="HOUR", group_by=("region",), per_customer=True),
        dict(window="MINUTE", group_by=("tier", "region")),
        dict(window="DAY", tz="Europe/Berlin", group_by=("tier",)),
        dict(window="HOUR", customers=("c1", "c3"), filters={"region": ["eu"]}),
        dict(window="HOUR", tz="Asia/Kolkata", filters={"customer": ["c2"], "tier": ["a", ""]}),
        # buckets that are unions of UTC days: whole days from the day rows (clickhouse.rollup)
        dict(window="DAY", group_by=("region",), per_customer=True),
        dict(window="MONTH", tz="Etc/UTC", customers=("c2",), filters={"tier": ["b"]}),
    ]
    ranges = [
        (start, start + timedelta(days=1)),
        (start + timedelta(hours=3, minutes=17), start + timedelta(hours=9, minutes=1)),
        # whole UTC days only; one whole day between two partial ones
        (start - timedelta(hours=20), start + timedelta(days=2, hours=4)),
        (start + timedelta(hours=1, minutes=3), start + timedelta(days=1, hours=5)),
    ]
    for case in cases:
        for from_, to in ranges:
            kw = dict(case)
            group_by = kw.pop("group_by", ())
            per_customer = kw.pop("per_customer", False)
            q = UsageQuery(
                tenant_id=tid,
                meter=meter,
                from_=from_,
                to=to,
                window=WindowSize(kw["window"]) if kw["window"] else None,
                tz=kw.get("tz", "UTC"),
                customers=list(kw.get("customers", ())),
                group_by=list(group_by) + (["customer"] if per_customer else []),
                filters=kw.get("filters", {}),
            )
            want = ground_truth(
                events,
                aggregation,
                from_=from_,
                to=to,
                group_by=group_by,
                per_customer=per_customer,
                **kw,
            )
            got = _actual(run_usage(sink.store, q))
            assert want, case
            assert got == want, (aggregation, case, from_, to)


@pytest.mark.parametrize("aggregation", [Aggregation.SUM, Aggregation.AVG])
def test_sums_past_decimal_38_9_are_exact(tenant, aggregation: Aggregation) -> None:
    """Windows each within Decimal(38, 9) whose total is not: the store's own sum of that
    column would wrap to a negative number without an error; the query sums in 76 digits."""
    repo, sink, tid, _ = tenant
    meter = _meter(repo, tid, aggregation, "big")
    t0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    big = Decimal("60000000000000000000000000000")  # 6e28: three windows sum past 10^29
    events = [Ev(f"e{i}", "c1", t0 + timedelta(minutes=i), big, {}) for i in range(3)]
    events.append(Ev("e3", "c1", t0 + timedelta(minutes=3), Decimal(4), {}))
    _store_events(sink, tid, meter, events, flushes=2)
    q = UsageQuery(tenant_id=tid, meter=meter, from_=t0, to=t0 + timedelta(days=1))
    (got,) = run_usage(sink.store, q)
    if aggregation == Aggregation.SUM:
        assert got.value == Decimal("180000000000000000000000000004")
    else:
        assert got.value == Decimal("45000000000000000000000000001")


def test_unique_count_across_rows_and_latest_ties(tenant) -> None:
    repo, sink, tid, _ = tenant
    t0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    uniq = _meter(repo, tid, Aggregation.UNIQUE_COUNT, "u")
    latest = _meter(repo, tid, Aggregation.LATEST, "l")
    evs = [
        Ev("a", "c1", t0, Decimal("1")),
        Ev("b", "c1", t0 + timedelta(seconds=5), Decimal("2")),
        Ev("c", "c1", t0 + timedelta(minutes=1), Decimal("1")),  # same value, other minute/row
        Ev("e", "c1", t0 + timedelta(minutes=1, seconds=59), Decimal("7")),
        Ev("d", "c1", t0 + timedelta(minutes=1, seconds=59), Decimal("9")),  # same time, smaller id
    ]
    for meter in (uniq, latest):
        # every event in its own flush: one row each, merged only by the query
        for e in evs:
            sink.commit("t", [], delta_rows(tid, meter.id, [e]), {})
    q = dict(tenant_id=tid, from_=t0, to=t0 + timedelta(hours=1), window=WindowSize.HOUR)
    assert [r.value for r in run_usage(sink.store, UsageQuery(meter=uniq, **q))] == [Decimal(4)]
    assert [r.value for r in run_usage(sink.store, UsageQuery(meter=latest, **q))] == [Decimal(7)]


@pytest.mark.parametrize(
    ("tz", "start"),
    [
        ("Europe/Berlin", datetime(2024, 3, 30, 12, tzinfo=UTC)),
        ("Europe/Berlin", datetime(2024, 10, 26, 12, tzinfo=UTC)),
        ("America/New_York", datetime(2024, 3, 9, 12, tzinfo=UTC)),
        ("America/New_York", datetime(2024, 11, 2, 12, tzinfo=UTC)),
        ("Asia/Kolkata", datetime(2024, 2, 28, 12, tzinfo=UTC)),
        ("Australia/Lord_Howe", datetime(2024, 4, 6, 6, tzinfo=UTC)),
        ("Australia/Lord_Howe", datetime(2024, 10, 5, 6, tzinfo=UTC)),
    ],
)
def test_windows_across_dst_and_half_hour_zones(tenant, tz: str, start: datetime) -> None:
    repo, sink, tid, _ = tenant
    meter = _meter(repo, tid, Aggregation.SUM, "s")
    rng = random.Random(f"{tz}{start}")
    # every minute of 3 days has an event: every window boundary is exercised
    events = [
        Ev(f"e{i}", "c1", start + timedelta(minutes=i), Decimal(rng.randrange(1, 1000)))
        for i in range(3 * 24 * 60)
    ]
    _store_events(sink, tid, meter, events, flushes=3)
    from_, to = start, start + timedelta(days=3)
    for window in ("HOUR", "DAY", "MONTH"):
        q = UsageQuery(
            tenant_id=tid, meter=meter, from_=from_, to=to, window=WindowSize(window), tz=tz
        )
        got = _actual(run_usage(sink.store, q))
        want = ground_truth(events, Aggregation.SUM, from_=from_, to=to, window=window, tz=tz)
        assert got == want, (tz, window)
        # windows tile the time line: each ends where the next starts
        assert all(a[1] == b[0] for a, b in itertools.pairwise(got))
    # the DST day really is 23/25 h (or 23.5/24.5 h) long
    days = run_usage(
        sink.store,
        UsageQuery(tenant_id=tid, meter=meter, from_=from_, to=to, window=WindowSize.DAY, tz=tz),
    )
    lengths = {(r.window_end - r.window_start) for r in days}
    if tz != "Asia/Kolkata":
        assert lengths - {timedelta(hours=24)}, lengths


def test_no_data_no_rows_and_null_values(tenant) -> None:
    repo, sink, tid, _ = tenant
    t0 = datetime(2024, 5, 1, tzinfo=UTC)
    for agg in Aggregation:
        meter = _meter(repo, tid, agg, f"n-{agg.value}".replace("_", "-"))
        q = UsageQuery(tenant_id=tid, meter=meter, from_=t0, to=t0 + timedelta(days=1))
        assert run_usage(sink.store, q) == []
    # a row without values (events matched, no value): avg/min/max/latest are NULL
    meter = _meter(repo, tid, Aggregation.AVG, "novalue")
    row = (
        tid,
        meter.id,
        "c",
        t0,
        "",
        "s",
        {},
        3,
        0,
        Decimal(0),
        None,
        None,
        [],
        (0, "", Decimal(0)),
        0,
    )
    sink.commit("t", [], [row], {})
    q = UsageQuery(tenant_id=tid, meter=meter, from_=t0, to=t0 + timedelta(days=1))
    assert [r.value for r in run_usage(sink.store, q)] == [None]


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.lists(
        st.tuples(
            st.integers(0, 3 * 24 * 60 - 1),
            st.sampled_from(["c1", "c2"]),
            st.decimals(
                min_value=-1000, max_value=1000, places=3, allow_nan=False, allow_infinity=False
            ),
        ),
        min_size=1,
        max_size=60,
    ),
    aggregation=st.sampled_from(list(Aggregation)),
    window=st.sampled_from(["MINUTE", "HOUR", "DAY", "MONTH", None]),
    tz=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]),
    flushes=st.integers(1, 4),
    edges=st.tuples(st.integers(0, 24 * 60), st.integers(0, 24 * 60)),
)
def test_property_any_events_any_window(
    tenant, data, aggregation, window, tz, flushes, edges
) -> None:
    """Any events, windows and zones; the range starts and ends anywhere within a day of the
    events (UTC day boundaries or not: day rows for whole days, minutes at the edges)."""
    repo, sink, tid, _ = tenant
    meter = _meter(repo, tid, aggregation, f"p{uuid.uuid4().hex[:12]}")
    start = datetime(2024, 10, 4, 10, tzinfo=UTC)
    events = [Ev(f"e{i}", c, start + timedelta(minutes=m), v) for i, (m, c, v) in enumerate(data)]
    _store_events(sink, tid, meter, events, flushes)
    from_ = start - timedelta(minutes=edges[0]) + timedelta(days=1)
    to = start + timedelta(days=2, minutes=edges[1])
    q = UsageQuery(
        tenant_id=tid,
        meter=meter,
        from_=from_,
        to=to,
        window=WindowSize(window) if window else None,
        tz=tz,
        group_by=["customer"],
    )
    want = ground_truth(
        events, aggregation, from_=from_, to=to, window=window, tz=tz, per_customer=True
    )
    assert _actual(run_usage(sink.store, q)) == want
