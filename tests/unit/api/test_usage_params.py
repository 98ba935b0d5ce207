from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from api.usage_params import (
    decimal_str,
    iso,
    native_csv,
    native_params,
    native_rows,
    openmeter_body_fields,
    openmeter_csv,
    openmeter_params,
    openmeter_query_fields,
    openmeter_rows,
    wants_csv,
)
from tally.errors import ValidationError

NOW = datetime(2025, 3, 10, 15, 30, 20, tzinfo=UTC)
DIMS = {"model": "$.model", "region": "$.region"}


def field_of(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return str(exc.value.details[0]["field"])


class TestNative:
    def test_defaults(self) -> None:
        p = native_params([], DIMS, NOW)
        assert p.from_ == datetime(2025, 3, 10, tzinfo=UTC)
        assert p.to == datetime(2025, 3, 10, 15, 31, tzinfo=UTC)
        assert p.window is None and p.tz == "UTC"
        assert p.by_customer is False

    def test_group_by_customer(self) -> None:
        p = native_params([("group_by", "customer"), ("group_by", "region")], DIMS, NOW)
        assert p.by_customer is True and p.group_by == ("region",)

    def test_default_from_is_local_midnight(self) -> None:
        p = native_params([("tz", "America/New_York")], DIMS, NOW)
        assert p.from_ == datetime(2025, 3, 10, 4, tzinfo=UTC)  # EDT started on 2025-03-09

    def test_full(self) -> None:
        q = [
            ("from", "2025-03-01T00:00:00Z"),
            ("to", str(1741564800000)),
            ("window", "hour"),
            ("tz", "Europe/Paris"),
            ("customer", "a"),
            ("customer", "b"),
            ("customer", "a"),
            ("group_by", "model"),
            ("filter[region]", "eu"),
            ("filter[region]", "us"),
        ]
        p = native_params(q, DIMS, NOW)
        assert p.window == "HOUR"
        assert p.to == datetime(2025, 3, 10, tzinfo=UTC)
        assert p.customers == ("a", "b")
        assert p.by_customer is True
        assert p.group_by == ("model",)
        assert p.filters == {"region": ("eu", "us")}

    @pytest.mark.parametrize(
        ("q", "field"),
        [
            ([("from", "yesterday")], "from"),
            ([("to", "2025-03-01T00:00:00")], "to"),
            ([("from", "2025-03-01T00:00:30Z")], "from"),
            ([("from", "2025-03-11T00:00:00Z")], "from"),
            ([("window", "WEEK")], "window"),
            ([("tz", "Mars/Olympus")], "tz"),
            ([("tz", "../../etc/passwd")], "tz"),
            ([("group_by", "color")], "group_by"),
            ([("filter[color]", "red")], "filter"),
            ([("bogus", "1")], "bogus"),
            ([("window", "HOUR"), ("window", "DAY")], "window"),
            ([("customer", "")], "customer"),
            ([("from", "2000-01-01T00:00:00Z"), ("window", "MINUTE")], "window"),
        ],
    )
    def test_bad_params_name_the_param(self, q: list[tuple[str, str]], field: str) -> None:
        with pytest.raises(ValidationError) as ei:
            native_params(q, DIMS, NOW)
        assert field_of(ei) == field
        assert field in ei.value.message


class TestOpenMeter:
    def test_query_string_arrays_and_sdk_filter_repr(self) -> None:
        q = [
            ("from", "2025-03-01T00:00:10.000Z"),
            ("to", "2025-03-02T00:00:00.5Z"),
            ("windowSize", "DAY"),
            ("subject", "a"),
            ("subject", "b"),
            ("groupBy", "model"),
            ("groupBy", "subject"),
            ("filterGroupBy", "{'region': 'eu'}"),  # what openmeter==1.0.0b236 sends
            ("filterGroupBy[model]", "gpt"),
            ("unknownThing", "x"),
        ]
        fields = openmeter_query_fields(q)
        p = openmeter_params(fields, DIMS, NOW)
        assert p.from_ == datetime(2025, 3, 1, tzinfo=UTC)  # floored
        assert p.to == datetime(2025, 3, 2, 0, 1, tzinfo=UTC)  # ceiled
        assert p.customers == ("a", "b")
        assert p.group_by == ("model",)
        assert p.by_customer is True
        assert p.filters == {"region": ("eu",), "model": ("gpt",)}

    def test_no_subject_means_no_customer_rows(self) -> None:
        p = openmeter_params({}, DIMS, NOW)
        assert p.by_customer is False

    def test_json_filter(self) -> None:
        fields = openmeter_query_fields([("filterGroupBy", '{"model": ["a", "b"]}')])
        assert fields["filterGroupBy"] == {"model": ["a", "b"]}

    @pytest.mark.parametrize("raw", ["__import__('os')", "[1]", "{1: 2}", "nope"])
    def test_bad_filter(self, raw: str) -> None:
        with pytest.raises(ValidationError) as ei:
            openmeter_query_fields([("filterGroupBy", raw)])
        assert field_of(ei) == "filterGroupBy"

    def test_body(self) -> None:
        body = {
            "from": "2025-03-01T00:00:00Z",
            "windowSize": "HOUR",
            "subject": ["a"],
            "groupBy": ["region"],
            "filterGroupBy": {"model": ["x"]},
        }
        p = openmeter_params(openmeter_body_fields(body), DIMS, NOW)
        assert p.window == "HOUR" and p.customers == ("a",) and p.filters == {"model": ("x",)}

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"subject": "a"}, "subject"),
            ({"from": 5}, "from"),
            ({"filterGroupBy": []}, "filterGroupBy"),
            ({"windowSize": "YEAR"}, "windowSize"),
            ({"groupBy": ["nope"]}, "groupBy"),
        ],
    )
    def test_bad_body(self, body: dict[str, object], field: str) -> None:
        with pytest.raises(ValidationError) as ei:
            openmeter_params(openmeter_body_fields(body), DIMS, NOW)
        assert field_of(ei) == field


@dataclass
class Row:
    window_start: datetime
    window_end: datetime
    customer: str | None
    group_by: dict[str, str]
    value: Decimal | None


ROWS = [
    Row(
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2025, 1, 1, 1, tzinfo=UTC),
        "=cmd|x",
        {"model": "gpt, 4"},
        Decimal("12.500000000"),
    ),
    Row(datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, 1, tzinfo=UTC), "b", {}, None),
]


def test_decimal_str() -> None:
    assert decimal_str(Decimal("12.500000000")) == "12.5"
    assert decimal_str(Decimal("100.000000000")) == "100"
    assert decimal_str(Decimal("1E+3")) == "1000"
    assert decimal_str(Decimal("0.000000001")) == "0.000000001"
    assert decimal_str(None) is None


def test_native_rows_and_csv() -> None:
    rows = native_rows(ROWS)
    assert rows[0] == {
        "window_start": "2025-01-01T00:00:00.000Z",
        "window_end": "2025-01-01T01:00:00.000Z",
        "customer": "=cmd|x",
        "group_by": {"model": "gpt, 4"},
        "value": "12.5",
    }
    assert rows[1]["value"] is None
    text = native_csv(rows, ["model"], by_customer=True)
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed[0] == ["window_start", "window_end", "customer", "model", "value"]
    assert parsed[1] == [
        "2025-01-01T00:00:00.000Z",
        "2025-01-01T01:00:00.000Z",
        "'=cmd|x",
        "gpt, 4",
        "12.5",
    ]
    assert parsed[2][-1] == "" and parsed[2][3] == ""


def test_openmeter_rows_and_csv() -> None:
    rows = openmeter_rows(ROWS, by_customer=False)
    assert rows == [
        {
            "value": 12.5,
            "windowStart": "2025-01-01T00:00:00.000Z",
            "windowEnd": "2025-01-01T01:00:00.000Z",
            "subject": None,
            "groupBy": {"model": "gpt, 4"},
        }
    ]
    parsed = list(csv.reader(io.StringIO(openmeter_csv(rows, ["model"], by_customer=False))))
    assert parsed == [
        ["window_start", "window_end", "model", "value"],
        ["2025-01-01T00:00:00.000Z", "2025-01-01T01:00:00.000Z", "gpt, 4", "12.5"],
    ]


def test_wants_csv() -> None:
    assert wants_csv("text/csv", None)
    assert wants_csv("text/csv, application/json;q=0.5", None)
    assert not wants_csv("application/json, text/csv", None)
    assert not wants_csv(None, None)
    assert not wants_csv("*/*", None)
    assert wants_csv(None, "csv") and not wants_csv("text/csv", "json")
    with pytest.raises(ValidationError):
        wants_csv(None, "xml")


def test_window_bounds_formatted_once_per_answer_read_like_iso_per_row() -> None:
    from datetime import timedelta
    from zoneinfo import ZoneInfo

    berlin = ZoneInfo("Europe/Berlin")
    base = datetime(2025, 3, 30, tzinfo=berlin)  # a DST change inside the windows
    rows = [
        Row(base + timedelta(hours=h), base + timedelta(hours=h + 1, microseconds=999), c, {}, v)
        for h in range(30)
        for c, v in (("a", Decimal(1)), ("b", Decimal("2.5")))
    ]
    rows.append(Row(datetime(2025, 3, 30, tzinfo=UTC), base, "c", {}, Decimal(3)))
    native = native_rows(rows)
    om = openmeter_rows(rows, by_customer=True)
    assert [(r["window_start"], r["window_end"]) for r in native] == [
        (iso(r.window_start), iso(r.window_end)) for r in rows
    ]
    assert [(r["windowStart"], r["windowEnd"]) for r in om] == [
        (iso(r.window_start), iso(r.window_end)) for r in rows
    ]
    assert native[-1]["window_start"] == "2025-03-30T00:00:00.000Z"
    assert native[-1]["window_end"] == "2025-03-29T23:00:00.000Z"
