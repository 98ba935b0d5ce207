"""Billing periods: month, quarter or year, aligned to the calendar or to an anchor's anniversary,
computed in the customer's IANA time zone and returned as aware UTC datetimes (ms precision).

Anniversary periods start at the anchor's local wall-clock time on the anchor's day of month,
clamped to the month's last day (anchor Jan 31 → Feb 28/29 → Mar 31: each period is computed from
the anchor, never chained). Calendar periods start at local midnight on the 1st of the month, of
the quarter (Jan/Apr/Jul/Oct) or of the year. Periods are half-open ``[start, end)`` and
contiguous; a period spanning a DST change is an hour shorter or longer in UTC.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas.pricing import Alignment, Interval
from schemas.timeutil import to_ms
from tally.errors import ValidationError

MONTHS: dict[Interval, int] = {Interval.MONTH: 1, Interval.QUARTER: 3, Interval.YEAR: 12}


@dataclass(frozen=True)
class Period:
    """A half-open ``[start, end)`` interval of aware UTC datetimes."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if value.tzinfo is None or value.utcoffset() is None:
                raise ValidationError(f"{name} must be timezone-aware", field=name)
        if self.end <= self.start:
            raise ValidationError("period end must be after its start", field="end")

    @property
    def duration(self) -> timedelta:
        return self.end - self.start

    def contains(self, at: datetime) -> bool:
        return self.start <= at < self.end


def zone(tz: str) -> ZoneInfo:
    """The IANA zone ``tz``; tally ValidationError naming ``tz`` if unknown."""
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValidationError(f"unknown time zone {tz!r}", field="tz") from None


def _aware(value: datetime, field: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(f"{field} must be timezone-aware", field=field)
    return value


def _local_anchor(anchor: date | datetime, zi: ZoneInfo) -> datetime:
    """The anchor as a naive local wall-clock datetime."""
    if isinstance(anchor, datetime):
        return _aware(anchor, "anchor").astimezone(zi).replace(tzinfo=None)
    return datetime.combine(anchor, time(0))


def _start(anchor_local: datetime, months: int, index: int, zi: ZoneInfo) -> datetime:
    """UTC start of period ``index`` (0 = the one starting at the anchor)."""
    m0 = anchor_local.year * 12 + (anchor_local.month - 1) + index * months
    year, month = divmod(m0, 12)
    month += 1
    day = min(anchor_local.day, calendar.monthrange(year, month)[1])
    local = datetime.combine(date(year, month, day), anchor_local.time(), tzinfo=zi)
    return to_ms(local.astimezone(UTC))


def _enums(interval: Interval | str, alignment: Alignment | str) -> tuple[int, Alignment]:
    try:
        months = MONTHS[Interval(interval)]
    except ValueError:
        raise ValidationError(
            f"interval must be month, quarter or year, got {interval!r}",
            field="interval",
        ) from None
    try:
        return months, Alignment(alignment)
    except ValueError:
        raise ValidationError(
            f"alignment must be calendar or anniversary, got {alignment!r}",
            field="alignment",
        ) from None


def _anchor_for(anchor: date | datetime | None, alignment: Alignment, zi: ZoneInfo) -> datetime:
    if alignment is Alignment.CALENDAR:
        return datetime(2000, 1, 1)  # noqa: DTZ001 - a naive local wall-clock time by design
    if anchor is None:
        raise ValidationError("anniversary alignment needs an anchor", field="anchor")
    return _local_anchor(anchor, zi)


def period_at(
    anchor: date | datetime | None,
    interval: Interval | str,
    index: int,
    tz: str = "UTC",
    alignment: Alignment | str = Alignment.ANNIVERSARY,
) -> Period:
    """Period number ``index`` counted from the anchor (negative = before it).

    For calendar alignment the index counts from the period containing 2000-01-01 local.
    """
    zi = zone(tz)
    months, align = _enums(interval, alignment)
    local = _anchor_for(anchor, align, zi)
    return Period(_start(local, months, index, zi), _start(local, months, index + 1, zi))


def period_containing(
    anchor: date | datetime | None,
    interval: Interval | str,
    at: datetime,
    tz: str = "UTC",
    alignment: Alignment | str = Alignment.ANNIVERSARY,
) -> Period:
    """The billing period containing ``at`` (half-open), as aware UTC datetimes.

    ``anchor`` is a date (local midnight) or an aware datetime (its local wall-clock time in
    ``tz`` is used); it is ignored for calendar alignment.
    """
    zi = zone(tz)
    months, align = _enums(interval, alignment)
    local = _anchor_for(anchor, align, zi)
    at = to_ms(_aware(at, "at"))
    at_local = at.astimezone(zi)
    elapsed = (at_local.year - local.year) * 12 + (at_local.month - local.month)
    k = elapsed // months
    while _start(local, months, k, zi) > at:
        k -= 1
    while _start(local, months, k + 1, zi) <= at:
        k += 1
    return Period(_start(local, months, k, zi), _start(local, months, k + 1, zi))


def next_period(
    period: Period,
    anchor: date | datetime | None,
    interval: Interval | str,
    tz: str = "UTC",
    alignment: Alignment | str = Alignment.ANNIVERSARY,
) -> Period:
    """The period right after ``period`` (its start is ``period.end``)."""
    return period_containing(anchor, interval, period.end, tz, alignment)
