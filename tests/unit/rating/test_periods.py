from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rating.periods import Period, next_period, period_at, period_containing
from tally.errors import ValidationError


def utc(y: int, m: int, d: int, h: int = 0) -> datetime:
    return datetime(y, m, d, h, tzinfo=UTC)


def test_end_of_month_anchor_clamps_and_recovers() -> None:
    anchor = date(2023, 1, 31)
    starts = [period_at(anchor, "month", k).start for k in range(5)]
    assert starts == [
        utc(2023, 1, 31),
        utc(2023, 2, 28),
        utc(2023, 3, 31),
        utc(2023, 4, 30),
        utc(2023, 5, 31),
    ]
    assert period_containing(anchor, "month", utc(2024, 2, 10)) == Period(
        utc(2024, 1, 31), utc(2024, 2, 29)
    )


def test_leap_day_yearly_anchor() -> None:
    p = period_containing(date(2024, 2, 29), "year", utc(2025, 6, 1))
    assert p == Period(utc(2025, 2, 28), utc(2026, 2, 28))
    assert period_at(date(2024, 2, 29), "year", 4).start == utc(2028, 2, 29)


def test_calendar_month_in_customer_zone_across_dst() -> None:
    p = period_containing(None, "month", utc(2024, 3, 15), "America/New_York", "calendar")
    assert p == Period(utc(2024, 3, 1, 5), utc(2024, 4, 1, 4))  # EST -> EDT
    assert p.duration == timedelta(days=31) - timedelta(hours=1)


def test_calendar_quarter_and_year() -> None:
    q = period_containing(None, "quarter", utc(2024, 5, 10), "Europe/Berlin", "calendar")
    assert q == Period(utc(2024, 3, 31, 22), utc(2024, 6, 30, 22))
    y = period_containing(None, "year", utc(2024, 1, 1), "Asia/Tokyo", "calendar")
    assert y == Period(utc(2023, 12, 31, 15), utc(2024, 12, 31, 15))  # already 2024 in Tokyo


def test_anniversary_keeps_local_time_of_day() -> None:
    anchor = datetime(2024, 1, 15, 10, tzinfo=ZoneInfo("Europe/Berlin"))
    p = period_containing(anchor, "month", utc(2024, 7, 20), "Europe/Berlin")
    assert p == Period(utc(2024, 7, 15, 8), utc(2024, 8, 15, 8))


def test_boundaries_are_half_open() -> None:
    anchor = date(2024, 1, 1)
    p = period_containing(anchor, "month", utc(2024, 2, 1))
    assert p.start == utc(2024, 2, 1)
    assert period_containing(anchor, "month", utc(2024, 2, 1) - timedelta(milliseconds=1)).end == (
        utc(2024, 2, 1)
    )


def test_before_anchor_and_errors() -> None:
    assert period_containing(date(2024, 5, 10), "month", utc(2024, 1, 1)) == Period(
        utc(2023, 12, 10), utc(2024, 1, 10)
    )
    with pytest.raises(ValidationError) as err:
        period_containing(None, "month", utc(2024, 1, 1), "Mars/Olympus", "calendar")
    assert [d["field"] for d in err.value.details] == ["tz"]
    with pytest.raises(ValidationError) as err:
        period_containing(date(2024, 1, 1), "month", datetime(2024, 1, 1))  # naive
    assert [d["field"] for d in err.value.details] == ["at"]
    with pytest.raises(ValidationError) as err:
        period_containing(None, "month", utc(2024, 1, 1))  # anniversary without anchor
    assert [d["field"] for d in err.value.details] == ["anchor"]
    with pytest.raises(ValidationError) as err:
        period_containing(None, "week", utc(2024, 1, 1), alignment="calendar")
    assert [d["field"] for d in err.value.details] == ["interval"]
    with pytest.raises(ValidationError) as err:
        period_containing(date(2024, 1, 1), "month", utc(2024, 1, 1), alignment="fiscal")
    assert [d["field"] for d in err.value.details] == ["alignment"]


zones = st.sampled_from(
    [
        "UTC",
        "America/New_York",
        "Europe/Berlin",
        "Australia/Lord_Howe",
        "Asia/Kolkata",
        "Pacific/Chatham",
        "America/Sao_Paulo",
    ]
)
instants = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1)).map(
    lambda d: d.replace(tzinfo=UTC, microsecond=d.microsecond // 1000 * 1000)
)


@settings(deadline=None)
@given(
    anchor=st.dates(min_value=date(2000, 1, 1), max_value=date(2039, 12, 31)),
    at=instants,
    interval=st.sampled_from(["month", "quarter", "year"]),
    alignment=st.sampled_from(["calendar", "anniversary"]),
    tz=zones,
)
def test_period_contains_at_and_periods_are_contiguous(
    anchor: date, at: datetime, interval: str, alignment: str, tz: str
) -> None:
    p = period_containing(anchor, interval, at, tz, alignment)
    assert p.contains(at)
    assert p.start.tzinfo is UTC and p.end.tzinfo is UTC
    nxt = next_period(p, anchor, interval, tz, alignment)
    assert nxt.start == p.end
    local = p.start.astimezone(ZoneInfo(tz))
    months = {"month": 1, "quarter": 3, "year": 12}[interval]
    if alignment == "calendar":
        assert (local.day, local.hour, local.minute) == (1, 0, 0)
        assert (local.month - 1) % months == 0
    else:
        last = calendar.monthrange(local.year, local.month)[1]
        assert local.day == min(anchor.day, last)
