"""``bulk_time_ms`` against ``fast_time_ms``, the reader it stands in for, value by value."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import example, given
from hypothesis import strategies as st

from api.ingest_parse import fast_time_ms
from api.ingest_times import bulk_time_ms

ALL = (-(2**62), 2**62)
# (fraction digits, zone): the forms fast_time_ms reads
FORMS = [(0, "Z"), (3, "Z"), (6, "Z"), (0, "+00:00"), (3, "+00:00"), (6, "+00:00")]


@st.composite
def form_texts(draw: st.DrawFn) -> str:
    """A time in one of the six forms from any digits: month 00-19, day 00-39, hour 00-29,
    minute and second 00-69, year 0000-9999, so that dates and times that do not exist (a
    31st of February, hour 24, second 60, year 0000) come up often."""
    frac, zone = draw(st.sampled_from(FORMS))
    year = draw(st.integers(0, 9999) | st.sampled_from([0, 1, 1900, 1970, 2000, 2024, 9999]))
    month, day = draw(st.integers(0, 19)), draw(st.integers(0, 39))
    hour, minute, second = (
        draw(st.integers(0, 29)),
        draw(st.integers(0, 69)),
        draw(st.integers(0, 69)),
    )
    text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    if frac:
        text += "." + "".join(
            draw(st.lists(st.sampled_from("0123456789"), min_size=frac, max_size=frac))
        )
    return text + zone


@st.composite
def one_form(draw: st.DrawFn) -> list[str]:
    """1-20 valid times of one form (the case the bulk reader is for), sometimes with one value
    replaced by a near miss of the same length."""
    frac, zone = draw(st.sampled_from(FORMS))
    spec = {0: "seconds", 3: "milliseconds", 6: "microseconds"}[frac]
    values = []
    for ms in draw(
        st.lists(st.integers(-62_135_596_800_000, 253_402_300_799_999), min_size=1, max_size=20)
    ):
        text = datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec=spec)
        values.append(text.replace("+00:00", zone))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(values) - 1))
        pos = draw(st.integers(0, len(values[i]) - 1))
        values[i] = values[i][:pos] + draw(st.sampled_from("0369-T:.Z+ a٣")) + values[i][pos + 1 :]
    return values


def _one_by_one(values: list[str], lo: int, hi: int) -> list[int] | None:
    read = [fast_time_ms(v) for v in values]
    if any(t is None or not lo <= t <= hi for t in read):
        return None
    return read  # type: ignore[return-value]


@given(st.lists(form_texts(), min_size=1, max_size=8) | one_form())
@example(["2024-02-29T23:59:59.999Z", "2023-02-29T00:00:00.000Z"])
@example(["0000-01-01T00:00:00Z"])
@example(["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999+00:00"])
@example(["2026-12-05T24:00:00.000Z"])
@example(["2026-12-05T23:59:60.000Z"])
def test_the_same_times_as_fast_time_ms(values: list[str]) -> None:
    """Whenever every value has one length, the bulk reader gives exactly the values
    ``fast_time_ms`` gives one by one, and None exactly when one of them is None."""
    got = bulk_time_ms(values, *ALL)
    if len(set(map(len, values))) == 1:
        assert got == _one_by_one(values, *ALL)
    else:
        assert got is None


@given(one_form(), st.integers(0, 2**40), st.integers(0, 2**40))
def test_the_bounds(values: list[str], below: int, above: int) -> None:
    """A time outside ``lo..hi`` makes the whole column None, as it makes the fast path decline."""
    expected = _one_by_one(values, *ALL)
    if expected is None:
        return
    lo, hi = min(expected) - below, max(expected) + above
    assert bulk_time_ms(values, lo, hi) == expected
    assert bulk_time_ms(values, min(expected) + 1, hi) is None
    assert bulk_time_ms(values, lo, max(expected) - 1) is None


def test_what_it_leaves_to_the_reader_one_by_one() -> None:
    good = "2026-12-05T19:01:35.337Z"
    assert bulk_time_ms([good, good], *ALL) == [fast_time_ms(good)] * 2
    for values, why in [
        ([], "no values"),
        ([good, 1_764_961_295_337], "an integer time"),
        ([good, None], "a missing time"),
        ([good, "2026-12-05T19:01:35Z"], "two forms (lengths)"),
        ([good, "2026-12-05T19:01:35.337z"], "a lower-case zone"),
        ([good, "2026-12-05T19:01:35.3٣7Z"], "a digit that is not ASCII"),
        ([good, "2026-12-05 19:01:35.337Z"], "a blank for T"),
        (["2026-12-05T19:01:35.337+02:00"], "another offset"),
        (["2026-12-05T19:01:35.33Z"], "a 2-digit fraction"),
        (["2026-02-30T19:01:35.337Z"], "a day that does not exist"),
        (["0000-12-05T19:01:35.337Z"], "year 0000"),
    ]:
        assert bulk_time_ms(values, *ALL) is None, why
