from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.jsonpath import MISSING, compile_path
from schemas.timeutil import epoch_ms, from_epoch_ms, parse_time


@given(st.integers(-(10**12), 10**13))
def test_epoch_ms_round_trip_is_exact(ms: int) -> None:
    assert epoch_ms(from_epoch_ms(ms)) == ms


def test_parse_time_forms() -> None:
    assert parse_time("2026-03-29T01:30:00.123456Z") == datetime(
        2026, 3, 29, 1, 30, 0, 123000, tzinfo=UTC
    )
    assert parse_time("2026-03-29T03:30:00+02:00") == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    assert parse_time(0) == datetime(1970, 1, 1, tzinfo=UTC)
    aware = datetime(2026, 1, 1, 5, tzinfo=timezone(timedelta(hours=5)))
    assert parse_time(aware) == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["2026-03-29T01:30:00", "yesterday", 1.5, True, None, 10**20])
def test_parse_time_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_time(bad)


def test_jsonpath_extracts() -> None:
    doc = {"a": {"b": [1, {"c": 3}]}, "x.y": 5, "q": None}
    assert compile_path("$.a.b[1].c").extract(doc) == 3
    assert compile_path("$.a.b[-2]").extract(doc) == 1
    assert compile_path('$["x.y"]').extract(doc) == 5
    assert compile_path("$.q").extract(doc) is None
    assert compile_path("$.a.z").extract(doc) is MISSING
    assert compile_path("$.a.b[7]").extract(doc) is MISSING
    assert compile_path("$.a.b.c").extract(doc) is MISSING


@pytest.mark.parametrize("bad", ["", "a.b", "$", "$.", "$..a", "$.a[", "$[x]", "$.a b"])
def test_jsonpath_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        compile_path(bad)
