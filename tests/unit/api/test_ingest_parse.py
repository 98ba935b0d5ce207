from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.ingest_parse import (
    Limits,
    ParseResult,
    as_items,
    check_count,
    cloudevents_shape,
    fast_time_ms,
    load_json,
    native_shape,
    parse_cloudevents,
    parse_cloudevents_body,
    parse_native,
    parse_native_body,
    row_to_event,
)
from schemas.envelope import EventColumns
from schemas.events import Event
from schemas.timeutil import epoch_ms
from tally.errors import PayloadTooLarge, UnsupportedMediaType, ValidationError
from tests.unit.api import ingest_reference as reference

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
NOW_MS = epoch_ms(NOW)
LIMITS = Limits(max_events=10, max_lateness_ms=35 * 86_400_000, max_future_ms=300_000)


def ev(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"id": "e1", "type": "api_call", "customer": "c1"}
    base.update(kw)
    return base


def fields_of(errors: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(e["index"], e["field"]) for e in errors]


class TestLoadJson:
    def test_malformed(self) -> None:
        with pytest.raises(ValidationError) as ei:
            load_json(b'{"id": ')
        assert "not valid JSON" in ei.value.message
        assert ei.value.details[0]["field"] == "body"

    @pytest.mark.parametrize("raw", [b"", b"   \n"])
    def test_empty(self, raw: bytes) -> None:
        with pytest.raises(ValidationError, match="empty"):
            load_json(raw)

    def test_ok(self) -> None:
        assert load_json(b'[{"a": 1}]') == [{"a": 1}]


class TestShapes:
    def test_single_and_batch(self) -> None:
        assert as_items({"a": 1}) == [{"a": 1}]
        assert as_items([{"a": 1}, 2]) == [{"a": 1}, 2]

    def test_empty_array(self) -> None:
        with pytest.raises(ValidationError, match="empty"):
            as_items([])

    @pytest.mark.parametrize("doc", [1, "x", None, True])
    def test_scalar(self, doc: object) -> None:
        with pytest.raises(ValidationError, match="must be"):
            as_items(doc)

    def test_single_only(self) -> None:
        with pytest.raises(ValidationError, match="one event object"):
            as_items([{}], batch=False)

    def test_batch_only(self) -> None:
        with pytest.raises(ValidationError, match="array"):
            as_items({}, single=False)

    def test_count_limit(self) -> None:
        check_count(10, LIMITS)
        with pytest.raises(PayloadTooLarge, match="limit is 10"):
            check_count(11, LIMITS)

    def test_content_types(self) -> None:
        assert cloudevents_shape("application/cloudevents+json") == (True, False)
        assert cloudevents_shape("application/cloudevents-batch+json; charset=utf-8") == (
            False,
            True,
        )
        assert cloudevents_shape("application/json") == (True, True)
        assert cloudevents_shape(None) == (True, True)
        with pytest.raises(UnsupportedMediaType, match="text/plain"):
            cloudevents_shape("text/plain")
        native_shape("application/json")
        native_shape(None)
        with pytest.raises(UnsupportedMediaType):
            native_shape("application/x-www-form-urlencoded")


class TestNative:
    def test_valid_defaults(self) -> None:
        res = parse_native([ev()], NOW_MS, LIMITS)
        assert res.errors == []
        assert res.rows == [("e1", "api_call", "c1", NOW_MS, {})]
        assert res.indexes == [0]

    def test_time_forms_keep_ms(self) -> None:
        items = [
            ev(id="a", time="2025-06-01T11:59:00.123Z"),
            ev(id="b", time="2025-06-01T13:59:00.123456+02:00"),
            ev(id="c", time=NOW_MS - 1),
            ev(id="d", time="2025-06-01t11:59:00.5z"),
        ]
        res = parse_native(items, NOW_MS, LIMITS)
        assert res.errors == []
        t = NOW - timedelta(minutes=1)
        assert [r[3] for r in res.rows] == [
            epoch_ms(t) + 123,
            epoch_ms(t) + 123,
            NOW_MS - 1,
            epoch_ms(t) + 500,
        ]

    @pytest.mark.parametrize(
        ("item", "field", "text"),
        [
            (ev(id=None), "id", "required"),
            ({"type": "t", "customer": "c"}, "id", "required"),
            (ev(id=5), "id", "must be a string"),
            (ev(id=""), "id", "empty"),
            (ev(id="x" * 257), "id", "longer"),
            (ev(type=None), "type", "required"),
            (ev(customer=["a"]), "customer", "string"),
            (ev(time="yesterday"), "time", "invalid time"),
            (ev(time="2025-06-01T12:00:00"), "time", "offset"),
            (ev(time=True), "time", "boolean"),
            (ev(time=1.5), "time", "number"),
            (ev(time=10**20), "time", "out of range"),
            (ev(properties=[1]), "properties", "object"),
            (ev(costumer="c"), "costumer", "unknown field"),
        ],
    )
    def test_field_errors(self, item: dict[str, object], field: str, text: str) -> None:
        res = parse_native([ev(id="ok"), item], NOW_MS, LIMITS)
        assert [r[0] for r in res.rows] == ["ok"]
        assert (1, field) in fields_of(res.errors)
        msg = next(e["message"] for e in res.errors if e["field"] == field)
        assert text in msg

    def test_not_an_object(self) -> None:
        res = parse_native([1, "x"], NOW_MS, LIMITS)
        assert fields_of(res.errors) == [(0, "event"), (1, "event")]
        assert res.rows == []

    def test_lateness_bound(self) -> None:
        old = NOW_MS - LIMITS.max_lateness_ms - 1
        future = NOW_MS + LIMITS.max_future_ms + 1
        edge = [NOW_MS - LIMITS.max_lateness_ms, NOW_MS + LIMITS.max_future_ms]
        res = parse_native(
            [ev(id="old", time=old), ev(id="fut", time=future)]
            + [ev(id=f"e{i}", time=t) for i, t in enumerate(edge)],
            NOW_MS,
            LIMITS,
        )
        assert fields_of(res.errors) == [(0, "time"), (1, "time")]
        assert "lateness bound" in res.errors[0]["message"]
        assert "future" in res.errors[1]["message"]
        assert [r[3] for r in res.rows] == edge

    def test_all_errors_of_one_event_reported(self) -> None:
        res = parse_native([{"time": "x", "properties": 3}], NOW_MS, LIMITS)
        assert {f for _, f in fields_of(res.errors)} == {
            "id",
            "type",
            "customer",
            "time",
            "properties",
        }
        assert res.rejected_indexes == [0]

    def test_row_to_event_equals_validated_event(self) -> None:
        item = ev(time="2025-06-01T11:59:00.123Z", properties={"n": 1})
        res = parse_native([item], NOW_MS, LIMITS)
        assert row_to_event(res.rows[0]) == Event.model_validate(item)


class TestCloudEvents:
    def ce(self, **kw: object) -> dict[str, object]:
        base: dict[str, object] = {
            "id": "e1",
            "source": "svc",
            "specversion": "1.0",
            "type": "api_call",
            "subject": "cust",
            "time": "2025-06-01T11:59:00.001Z",
            "data": {"tokens": 3},
        }
        base.update(kw)
        return base

    def test_mapping(self) -> None:
        res = parse_cloudevents(
            [self.ce(datacontenttype="application/json", ext=1)], NOW_MS, LIMITS
        )
        assert res.errors == []
        assert res.rows == [
            ("e1", "api_call", "cust", epoch_ms(NOW - timedelta(minutes=1)) + 1, {"tokens": 3})
        ]

    def test_data_null_and_time_default(self) -> None:
        item = self.ce(data=None)
        del item["time"]
        res = parse_cloudevents([item], NOW_MS, LIMITS)
        assert res.rows == [("e1", "api_call", "cust", NOW_MS, {})]

    @pytest.mark.parametrize("missing", ["id", "source", "specversion", "type", "subject"])
    def test_required(self, missing: str) -> None:
        item = self.ce()
        del item[missing]
        res = parse_cloudevents([item], NOW_MS, LIMITS)
        assert fields_of(res.errors) == [(0, missing)]

    def test_data_must_be_object(self) -> None:
        res = parse_cloudevents([self.ce(data="x")], NOW_MS, LIMITS)
        assert fields_of(res.errors) == [(0, "data")]


ids = st.text(min_size=1, max_size=20)
props = st.dictionaries(
    st.text(max_size=5), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5), max_size=3
)


@given(
    st.lists(
        st.fixed_dictionaries(
            {"id": ids, "type": ids, "customer": ids},
            optional={
                "time": st.integers(NOW_MS - LIMITS.max_lateness_ms, NOW_MS + 300_000),
                "properties": props,
            },
        ),
        max_size=20,
    )
)
def test_valid_events_round_trip(items: list[dict[str, object]]) -> None:
    """Every valid event is kept, in order, and matches pydantic's own validation; a body of
    them (an array, at least one event) goes through the one-call decoder with the same rows."""
    body = orjson.dumps(items)
    res = parse_native(orjson.loads(body), NOW_MS, LIMITS)
    assert res.errors == []
    assert res.indexes == list(range(len(items)))
    for item, row in zip(items, res.rows, strict=True):
        expected = Event.model_validate({"time": NOW_MS, **item})
        assert row_to_event(row) == expected
    fast = parse_native_body(body, NOW_MS, LIMITS)
    if 0 < len(items) <= LIMITS.max_events:
        assert fast is not None
        _same_events(fast, res)
    else:  # an empty array, too many events: errors, worded by the general path
        assert fast is None


@given(
    st.lists(
        st.one_of(st.none(), st.integers(), st.text(), st.dictionaries(st.text(), st.integers())),
        max_size=10,
    )
)
def test_garbage_never_raises(items: list[object]) -> None:
    """Arbitrary input gives a result naming index and field, never an exception."""
    res = parse_native(items, NOW_MS, LIMITS)
    assert len(res.rows) + len(res.rejected_indexes) == len(items)
    for e in res.errors:
        assert set(e) == {"index", "field", "message"} and e["message"]


# --- the fast path against the earlier implementation (tests/unit/api/ingest_reference.py) ---

WIDE = Limits(max_events=10, max_lateness_ms=10**14, max_future_ms=10**14)


@st.composite
def time_strings(draw: st.DrawFn) -> str:
    """RFC 3339-like strings: the forms the fast path reads, their near misses, and garbage."""
    dt = draw(
        st.datetimes(
            min_value=datetime(1, 1, 1, 0, 0, 1),
            max_value=datetime(9999, 12, 31, 23, 59, 58),
        )
    )
    head = dt.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0")
    if draw(st.booleans()):
        head = head[:10] + draw(st.sampled_from(["T", "t", " ", "_"])) + head[11:]
    digits = draw(st.sampled_from(["", "1", "12", "123", "1234", "123456", "1234567"]))
    if digits:
        digits = f"{dt.microsecond:06d}{dt.microsecond:06d}"[: len(digits)]
    if draw(st.booleans()):
        digits = draw(st.text(alphabet="0123456789٣x ", min_size=0, max_size=7))
    frac = "." + digits if digits or draw(st.booleans()) else ""
    tz = draw(
        st.sampled_from(["Z", "z", "+00:00", "-00:00", "+02:00", "-05:30", "", "+0000", "Z "])
    )
    text = head + frac + tz
    if draw(st.integers(0, 9)) == 0:  # damage one character
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(st.sampled_from(["9", "-", ":", "x", ""])) + text[i + 1 :]
    return text


times = (
    time_strings()
    | st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.integers(NOW_MS - 10**10, NOW_MS + 10**10)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.just([1])
)
strings = st.sampled_from(["e1", "x" * 256, "x" * 257, "", " ", "é"]) | st.text(max_size=5)
values = strings | st.none() | st.integers() | st.booleans() | st.just({"k": 1}) | st.just(["a"])
props_any = props | st.none() | st.integers() | st.text(max_size=3) | st.just([1])


def _event(draw: st.DrawFn, names: list[str], payload: str) -> object:
    if draw(st.integers(0, 19)) == 0:
        return draw(values)
    item: dict[str, object] = {}
    for name in names:
        if draw(st.integers(0, 9)) == 0:
            continue  # missing
        item[name] = draw(strings if draw(st.integers(0, 3)) else values)
    if draw(st.booleans()):
        item["time"] = draw(times)
    if draw(st.booleans()):
        item[payload] = draw(props_any)
    if draw(st.integers(0, 9)) == 0:
        item[draw(st.sampled_from(["costumer", "extra", "datacontenttype"]))] = 1
    return item


@st.composite
def native_items(draw: st.DrawFn) -> list[object]:
    return [
        _event(draw, ["id", "type", "customer"], "properties")
        for _ in range(draw(st.integers(0, 8)))
    ]


@st.composite
def cloudevent_items(draw: st.DrawFn) -> list[object]:
    names = ["id", "source", "specversion", "type", "subject"]
    return [_event(draw, names, "data") for _ in range(draw(st.integers(0, 8)))]


def _same(new: object, old: object) -> None:
    assert new.rows == old.rows  # type: ignore[attr-defined]
    assert new.indexes == old.indexes  # type: ignore[attr-defined]
    assert new.errors == old.errors  # type: ignore[attr-defined]
    assert new.total == old.total  # type: ignore[attr-defined]


@given(native_items(), st.sampled_from([LIMITS, WIDE]))
def test_native_fast_path_matches_the_earlier_parser(items: list[object], limits: Limits) -> None:
    """Same rows, same indexes, same {index, field, message} errors as before the fast path."""
    _same(parse_native(items, NOW_MS, limits), reference.parse_native(items, NOW_MS, limits))


def _same_events(fast: EventColumns, general: ParseResult) -> None:
    """The one-call decoder's events are the general path's rows, every event of the request
    in order, and none rejected."""
    assert fast.rows() == general.rows
    assert general.indexes == list(range(len(fast))) == list(range(general.total))
    assert general.errors == []


def _json(items: list[object], indent: bool) -> bytes:
    """``items`` as a client may send them: integers of any size, non-ASCII escaped or not,
    ``Infinity`` (which is not JSON), indented or compact."""
    return json.dumps(items, indent=2 if indent else None, ensure_ascii=indent).encode()


def _general(
    parse: Callable[[list[Any], int, Limits], ParseResult], body: bytes, limits: Limits
) -> ParseResult | None:
    """What ``load_json`` + ``parse`` make of ``body`` (None: it is refused whole)."""
    try:
        return parse(as_items(load_json(body)), NOW_MS, limits)
    except (ValidationError, PayloadTooLarge):
        return None


def _against_general(
    read: Callable[[bytes, int, Limits], EventColumns | None],
    parse: Callable[[list[Any], int, Limits], ParseResult],
    items: list[object],
    limits: Limits,
    indent: bool,
    extension: str | None = None,
) -> None:
    """The one-call decoder ``read`` answers only when every event is valid, with the rows,
    indexes and count of ``load_json`` + ``parse``; for anything else it returns None."""
    body = _json(items, indent)
    general = _general(parse, body, limits)
    fast = read(body, NOW_MS, limits)
    if general is None or general.errors or not items:
        assert fast is None
    elif fast is not None:
        _same_events(fast, general)
    else:  # valid, yet not taken: a time form left to the general path, an extension attribute
        assert any(
            type(i) is dict
            and (extension in i or (i.get("time") is not None and type(i["time"]) is not int))
            for i in items
        )


@st.composite
def near_times(draw: st.DrawFn) -> object:
    """Event times around LIMITS' bounds (35 days back, 5 minutes ahead): integers, or strings
    in the forms the fast reader knows and one it leaves to the general path."""
    ms = draw(st.integers(NOW_MS - 36 * 86_400_000, NOW_MS + 400_000))
    form = draw(st.sampled_from(["int", ".fffZ", "Z", ".ffffff+00:00", "+00:00", "+02:00"]))
    if form == "int":
        return ms
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    if form == "+02:00":
        return dt.astimezone(timezone(timedelta(hours=2))).isoformat(timespec="milliseconds")
    spec = {".fffZ": "milliseconds", ".ffffff+00:00": "microseconds"}.get(form, "seconds")
    text = dt.isoformat(timespec=spec)
    return text.replace("+00:00", "Z") if form.endswith("Z") else text


@st.composite
def mostly_valid(draw: st.DrawFn, names: list[str], payload: str, extension: str) -> list[object]:
    """1-8 valid events (times near the bounds), one of them sometimes replaced by an event
    of ``_event`` (mostly invalid) or given an extension attribute: the bodies the decoder
    takes, and their near misses."""
    items: list[object] = []
    for _ in range(draw(st.integers(1, 8))):
        item: dict[str, object] = {name: draw(ids) for name in names}
        if draw(st.booleans()):
            item["time"] = draw(near_times() | st.none())
        if draw(st.booleans()):
            item[payload] = draw(props | st.none())
        items.append(item)
    i = draw(st.integers(0, len(items) - 1))
    change = draw(st.integers(0, 5))
    if change == 0:
        items[i] = _event(draw, names, payload)
    elif change == 1:
        items[i] = {**items[i], extension: draw(values)}  # type: ignore[dict-item]
    return items


@given(
    native_items() | mostly_valid(["id", "type", "customer"], "properties", "costumer"),
    st.sampled_from([LIMITS, WIDE]),
    st.booleans(),
)
def test_native_body_decoder_matches_the_general_path(
    items: list[object], limits: Limits, indent: bool
) -> None:
    _against_general(parse_native_body, parse_native, items, limits, indent)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"id": "e1", "type": "t", "customer": "c"}', "a single object"),
        (b'[{"id": "e1", "type": "t", "customer": "c", "time": 1748779200000.0}]', "float time"),
        (
            b'[{"id": "e1", "type": "t", "customer": "c", "time": "2025-06-01T12:00:00+02:00"}]',
            "a time form the fast reader leaves to the general path",
        ),
        (b'[{"id": "e1", "type": "t", "customer": "c", "costumer": "c"}]', "unknown field"),
        (b'[{"id": "", "type": "t", "customer": "c"}]', "empty id"),
        (b'[{"id": "e1", "type": "t", "customer": "c", "properties": [1]}]', "properties a list"),
        (b'[{"id": "e1", "type": "t", "customer": "c", "time": 1}]', "too late"),
        (b'[{"id": "e1", "type": "t", "customer": "c"}] x', "trailing bytes"),
        (rb'[{"id": "e1", "type": "t", "customer": "\ud800"}]', "a lone surrogate"),
        (b'[{"id": "e1", "type": "t", "customer": "\xff"}]', "invalid UTF-8"),
        (
            b"[" + b",".join([b'{"id": "e1", "type": "t", "customer": "c"}'] * 11) + b"]",
            "more events than max_events",
        ),
    ],
)
def test_native_body_decoder_leaves_the_rest_to_the_general_path(body: bytes, why: str) -> None:
    assert parse_native_body(body, NOW_MS, LIMITS) is None, why


def test_native_body_decoder_reads_what_orjson_reads() -> None:
    """Lengths in characters (256 of them, multi-byte), the last of repeated keys, blanks, escapes,
    null properties; and integers beyond 64 bits, the one documented difference (exact here,
    floats in orjson; ``api.ingest`` sends such a body to the general path)."""
    long_id = "é" * 256
    body = (
        '[ {"id": "' + long_id + '", "type": "t", "type": "u", "customer": "c\\u00e9",\n'
        '   "time": "2025-06-01T11:59:59.500Z", "properties": {"a": 1, "a": [2.5, -0, "x"]}},\n'
        ' {"id": "e2", "type": "t", "customer": "c", "properties": null, "time": null} ]'
    ).encode()
    fast = parse_native_body(body, NOW_MS, LIMITS)
    assert fast is not None
    _same_events(fast, parse_native(orjson.loads(body), NOW_MS, LIMITS))
    assert fast.row(0) == (long_id, "u", "cé", NOW_MS - 500, {"a": [2.5, 0, "x"]})
    assert fast.row(1) == ("e2", "t", "c", NOW_MS, {})
    assert parse_native_body(body.replace(rb"\u00e9", rb"\u00e9" * 256), NOW_MS, LIMITS) is None
    big = b'[{"id": "e1", "type": "t", "customer": "c", "properties": {"n": 18446744073709551616}}]'
    fast = parse_native_body(big, NOW_MS, LIMITS)
    assert fast is not None and fast.properties[0] == {"n": 2**64}
    assert parse_native(orjson.loads(big), NOW_MS, LIMITS).rows[0][4] == {"n": float(2**64)}


@given(
    cloudevent_items()
    | mostly_valid(["id", "source", "specversion", "type", "subject"], "data", "extra"),
    st.sampled_from([LIMITS, WIDE]),
)
def test_cloudevents_body_decoder_matches_the_general_path(
    items: list[object], limits: Limits
) -> None:
    _against_general(parse_cloudevents_body, parse_cloudevents, items, limits, False, "extra")


def test_cloudevents_body_decoder() -> None:
    """OpenMeter's attributes under Tally's names; ``datacontenttype`` read and dropped; an
    extension attribute (whose value the decoder would only skip) goes to the general path, as
    does a body the general path refuses for a value inside one (a number out of range)."""
    ce = {
        "id": "e1",
        "source": "s",
        "specversion": "1.0",
        "type": "t",
        "subject": "c1",
        "time": "2025-06-01T11:59:59.500Z",
        "data": {"a": 1},
        "datacontenttype": "application/json",
    }
    body = orjson.dumps([ce, {**ce, "id": "e2", "data": None, "time": None}])
    fast = parse_cloudevents_body(body, NOW_MS, LIMITS)
    assert fast is not None
    assert fast.rows() == [
        ("e1", "t", "c1", NOW_MS - 500, {"a": 1}),
        ("e2", "t", "c1", NOW_MS, {}),
    ]
    _same_events(fast, parse_cloudevents(orjson.loads(body), NOW_MS, LIMITS))
    assert parse_cloudevents_body(orjson.dumps([{**ce, "ext": 1}]), NOW_MS, LIMITS) is None
    out_of_range = orjson.dumps([ce])[:-2] + b',"ext":1e400}]'
    with pytest.raises(ValidationError):
        load_json(out_of_range)
    assert parse_cloudevents_body(out_of_range, NOW_MS, LIMITS) is None
    assert parse_cloudevents_body(orjson.dumps(ce), NOW_MS, LIMITS) is None  # one object


@given(cloudevent_items(), st.sampled_from([LIMITS, WIDE]))
def test_cloudevents_fast_path_matches_the_earlier_parser(
    items: list[object], limits: Limits
) -> None:
    _same(
        parse_cloudevents(items, NOW_MS, limits),
        reference.parse_cloudevents(items, NOW_MS, limits),
    )


@given(time_strings() | st.text(max_size=40))
def test_fast_time_is_fromisoformat_truncated_to_ms(text: str) -> None:
    """Whenever the fast reader answers, it answers what datetime.fromisoformat says."""
    ms = fast_time_ms(text)
    if ms is None:
        return
    dt = datetime.fromisoformat(text)
    assert dt.utcoffset() == timedelta(0)
    assert ms == (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


@pytest.mark.parametrize(
    "text",
    [
        "2025-06-01T11:59:00Z",
        "2025-06-01T11:59:00+00:00",
        "2025-06-01T11:59:00.123Z",
        "2025-06-01T11:59:00.123+00:00",
        "2025-06-01T11:59:00.123456Z",
        "2025-06-01T11:59:00.123999+00:00",
        "1969-12-31T23:59:59.999Z",
    ],
)
def test_fast_time_reads_the_common_forms(text: str) -> None:
    dt = datetime.fromisoformat(text)
    assert fast_time_ms(text) == (dt - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(
        milliseconds=1
    )


@pytest.mark.parametrize(
    "text",
    [
        "2025-06-01T11:59:00.12Z",  # other fraction lengths: the general path
        "2025-06-01t11:59:00Z",
        "2025-06-01T11:59:00.1٣3Z",
        "2025-02-30T11:59:00Z",
        "2025-06-01T24:00:00Z",
        "2025-06-01T11:59:00.123-00:00",
        "2025-06-01T11:59:00.123",
    ],
)
def test_fast_time_leaves_the_rest_to_the_general_path(text: str) -> None:
    assert fast_time_ms(text) is None


def test_load_json_pauses_the_collector_and_restores_it() -> None:
    import gc

    assert gc.isenabled()
    assert load_json(b'[{"a": {"b": [1]}}]') == [{"a": {"b": [1]}}]
    assert gc.isenabled()
    with pytest.raises(ValidationError):
        load_json(b"[{")
    assert gc.isenabled()


@pytest.mark.parametrize("time", [-2_208_988_800_001, "1899-12-31T23:59:59.999Z"])
@pytest.mark.parametrize("parse", [parse_native, parse_cloudevents])
def test_fast_paths_keep_the_store_range_under_wide_lateness_bounds(
    time: object, parse: Callable[..., Any]
) -> None:
    """A lateness bound reaching before 1900 does not let a time the store cannot hold through
    the fast path (found by the comparison with the earlier parser above)."""
    if parse is parse_native:
        base: dict[str, object] = {"id": "e1", "type": "t", "customer": "c"}
    else:
        base = {"id": "e1", "source": "s", "specversion": "1.0", "type": "t", "subject": "c"}
    item = {**base, "time": time}
    res = parse([item], NOW_MS, WIDE)
    assert res.rows == [] and [e["field"] for e in res.errors] == ["time"]
    assert "years 1900..2299" in res.errors[0]["message"]
    edge = dict(item, time=-2_208_988_800_000)  # the first millisecond of 1900: kept
    assert [r[3] for r in parse([edge], NOW_MS, WIDE).rows] == [-2_208_988_800_000]
    body = orjson.dumps([item])
    fast = parse_native_body if parse is parse_native else parse_cloudevents_body
    assert fast(body, NOW_MS, WIDE) is None  # the general path words it
