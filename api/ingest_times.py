"""Event times of a whole request read at once (numpy), for the ingest decoder's fast path.

A body's times are nearly always one form written by one formatter: JavaScript's
``toISOString()`` and most clients write ``YYYY-MM-DDTHH:MM:SS.fffZ``. ``bulk_time_ms`` reads
a column of such strings without a Python call per event: the strings are joined into one
ASCII buffer and viewed as an ``(events, length)`` byte matrix; its columns are checked (the
separators, ASCII digits) and the ``YYYY-MM-DDTHH:MM:SS`` part of every row is read by numpy's
ISO 8601 parser, which refuses a month, day, hour, minute or second out of range as
``datetime`` does (year 0000, which numpy reads and ``datetime`` does not have, is refused
here).

It takes exactly the forms ``api.ingest_parse.fast_time_ms`` takes (a 3- or 6-digit fraction or
none, then ``Z`` or ``+00:00``), only when every value has the same one, and gives the same
milliseconds (a 6-digit fraction is truncated to the millisecond); anything else -- another
form, a mix of forms or lengths, an integer or a missing time, a date that does not exist --
is None, and the caller reads the times one by one (which words the problems). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt


class _Form(NamedTuple):
    """One string form: where its fixed characters are and which places hold digits."""

    fixed_at: npt.NDArray[np.intp]
    fixed: npt.NDArray[np.uint8]
    digits_at: npt.NDArray[np.intp]
    frac: int  # the fraction's digits: 0, 3 or 6 (beyond the third: checked, not used)


def _form(frac: int, zone: str) -> tuple[int, _Form]:
    fixed = {4: "-", 7: "-", 10: "T", 13: ":", 16: ":"}
    end = 19
    if frac:
        fixed[19] = "."
        end = 20 + frac
    for k, ch in enumerate(zone):
        fixed[end + k] = ch
    digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, *range(20, 20 + frac)]
    at = sorted(fixed)
    form = _Form(
        np.array(at, dtype=np.intp),
        np.array([ord(fixed[k]) for k in at], dtype=np.uint8),
        np.array(digits, dtype=np.intp),
        frac,
    )
    return end + len(zone), form


# length -> form: the forms of ``fast_time_ms`` (each length is one form)
_FORMS = dict(_form(frac, zone) for frac in (0, 3, 6) for zone in ("Z", "+00:00"))
# 0001-01-01T00:00:00Z in epoch seconds: the first time ``datetime`` has (numpy also reads
# year 0000)
_YEAR_ONE_S = -62_135_596_800
_ZERO = np.uint8(ord("0"))


def bulk_time_ms(values: Sequence[object], lo: int, hi: int) -> list[int] | None:
    """Epoch milliseconds of every value, when all are strings of one form ``fast_time_ms``
    reads and every time is within ``lo..hi``; else None (nothing is worded here)."""
    if not values:
        return None
    try:
        lengths = set(map(len, values))  # type: ignore[arg-type]
        text = "".join(values)  # type: ignore[arg-type]
    except TypeError:  # an integer, None, or another non-string
        return None
    if len(lengths) != 1:
        return None
    (length,) = lengths
    form = _FORMS.get(length)
    if form is None:
        return None
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        return None
    grid = np.frombuffer(raw, dtype=np.uint8).reshape(len(values), length)
    if not (grid[:, form.fixed_at] == form.fixed).all():
        return None
    if not (grid[:, form.digits_at] - _ZERO <= 9).all():  # not a digit: wraps to 10..255
        return None
    # YYYY-MM-DDTHH:MM:SS of every value, read by numpy's ISO 8601 parser, which refuses a
    # month, day, hour, minute or second out of range (as ``datetime`` does)
    heads = np.ascontiguousarray(grid[:, :19]).view("S19").ravel()
    try:
        seconds = heads.astype("datetime64[s]").astype(np.int64)
    except ValueError:
        return None
    if int(seconds.min()) < _YEAR_ONE_S:
        return None
    ms = seconds * 1000
    if form.frac:
        fraction = grid[:, 20:23].astype(np.int64) - ord("0")
        ms += fraction[:, 0] * 100 + fraction[:, 1] * 10 + fraction[:, 2]
    if int(ms.min()) < lo or int(ms.max()) > hi:
        return None
    out: list[int] = ms.tolist()
    return out
