"""Time helpers: timezone-aware UTC with millisecond precision, everywhere."""

from __future__ import annotations

from datetime import UTC, datetime

# Accepted epoch-millisecond range: years 1..9999.
EPOCH_MS_MIN = -62_135_596_800_000
EPOCH_MS_MAX = 253_402_300_799_999


def utc_now() -> datetime:
    return to_ms(datetime.now(UTC))


def to_ms(dt: datetime) -> datetime:
    """Truncate to milliseconds and convert to UTC. Naive datetimes are rejected."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware")
    dt = dt.astimezone(UTC)
    return dt.replace(microsecond=dt.microsecond - dt.microsecond % 1000)


def epoch_ms(dt: datetime) -> int:
    """Exact integer milliseconds since the epoch (no float rounding)."""
    dt = to_ms(dt)
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def from_epoch_ms(ms: int) -> datetime:
    from datetime import timedelta

    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def parse_time(value: object) -> datetime:
    """RFC 3339 string (offset required) or integer epoch milliseconds -> aware UTC, ms precision."""
    if isinstance(value, bool):
        raise ValueError("time must be an RFC 3339 string or epoch milliseconds")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON 1700000000000.0 is an integer too
    if isinstance(value, int):
        if not EPOCH_MS_MIN <= value <= EPOCH_MS_MAX:
            raise ValueError("epoch milliseconds out of range")
        return from_epoch_ms(value)
    if isinstance(value, datetime):
        return to_ms(value)
    if isinstance(value, str):
        s = value.strip()
        if s.endswith(("Z", "z")):
            s = s[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(s)
        except ValueError as exc:
            raise ValueError(f"not an RFC 3339 timestamp: {value!r}") from exc
        if dt.tzinfo is None:
            raise ValueError(f"timestamp needs a UTC offset or Z: {value!r}")
        try:
            return to_ms(dt)
        except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
            raise ValueError(f"timestamp out of range (years 1..9999 in UTC): {value!r}") from None
    raise ValueError("time must be an RFC 3339 string or epoch milliseconds")
