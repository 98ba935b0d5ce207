"""Pure mapping of Segment messages to events: every message is kept, ignored or named as bad."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.ingest_parse import Limits
from api.segment_parse import CustomerRule, parse_messages
from schemas.segment import SegmentConfigIn, WebhookSecretIn, normalize_property

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
LIMITS = Limits(max_events=1000, max_lateness_ms=35 * 86_400_000, max_future_ms=300_000)


def parse(msgs: list[Any], rule: CustomerRule | None = None, **kw: Any) -> Any:
    return parse_messages(msgs, now_ms=NOW_MS, limits=LIMITS, rule=rule or CustomerRule(), **kw)


def test_track_maps_every_field() -> None:
    res = parse(
        [
            {
                "type": "track",
                "messageId": "m1",
                "userId": "u1",
                "anonymousId": "a1",
                "event": "Signed Up",
                "properties": {"plan": "pro", "seats": 3},
                "timestamp": "2026-03-01T11:59:00.123Z",
            }
        ]
    )
    assert res.errors == []
    assert res.rows == [
        ("m1", "Signed Up", "u1", NOW_MS - 60_000 + 123, {"plan": "pro", "seats": 3})
    ]


def test_customer_and_time_fallbacks() -> None:
    res = parse(
        [
            {"type": "track", "messageId": "a", "anonymousId": "anon", "event": "e",
             "originalTimestamp": "2026-03-01T11:00:00Z"},
            {"type": "track", "messageId": "b", "userId": 42, "event": "e"},
        ]
    )  # fmt: skip
    assert res.errors == []
    assert res.rows[0][2:4] == ("anon", NOW_MS - 3_600_000)
    assert res.rows[1][2:5] == ("42", NOW_MS, {})


def test_implied_type_and_ignored_types() -> None:
    res = parse(
        [{"messageId": "t", "userId": "u", "event": "e", "type": "identify"}],
        implied_type="track",
    )
    assert len(res.rows) == 1
    res = parse([{"type": t.upper()} for t in ("identify", "page", "screen", "group", "alias")])
    assert res.rows == [] and res.errors == []
    assert res.ignored == {"identify": 1, "page": 1, "screen": 1, "group": 1, "alias": 1}


def test_customer_property_with_and_without_fallback() -> None:
    msgs: list[Any] = [
        {"type": "track", "messageId": "1", "userId": "u", "event": "e",
         "context": {"groupId": "g1"}},
        {"type": "track", "messageId": "2", "userId": "u", "event": "e"},
        {"type": "track", "messageId": "3", "userId": "u", "event": "e",
         "context": {"groupId": {"nested": 1}}},
    ]  # fmt: skip
    strict = parse(msgs, CustomerRule.of("context.groupId", False))
    assert [r[2] for r in strict.rows] == ["g1"]
    assert [(e["index"], e["field"]) for e in strict.errors] == [
        (1, "context.groupId"),
        (2, "context.groupId"),
    ]
    lenient = parse(msgs, CustomerRule.of("context.groupId", True), batch_context={})
    assert [r[2] for r in lenient.rows] == ["g1", "u"]
    from_batch = parse(msgs[1:2], CustomerRule.of("context.groupId", False),
                       batch_context={"groupId": "gb"})  # fmt: skip
    assert [r[2] for r in from_batch.rows] == ["gb"]


def test_bounds_and_limits() -> None:
    old = (NOW - timedelta(days=36)).isoformat()
    future = (NOW + timedelta(hours=1)).isoformat()
    msgs: list[Any] = [
        {"type": "track", "messageId": "1", "userId": "u", "event": "e", "timestamp": old},
        {"type": "track", "messageId": "2", "userId": "u", "event": "e", "timestamp": future},
        {"type": "track", "messageId": "3", "userId": "u", "event": "e",
         "timestamp": "2026-03-01T11:00:00"},
        {"type": "track", "messageId": "4", "userId": "u", "event": "e",
         "properties": {"x": "y" * 40_000}},
        {"type": "track", "messageId": "5", "userId": "u", "event": "e"},
    ]  # fmt: skip
    res = parse(msgs, max_messages=4)
    by_index = {e["index"]: e for e in res.errors}
    assert "lateness bound" in by_index[0]["message"]
    assert "in the future" in by_index[1]["message"]
    assert by_index[2]["field"] == "timestamp" and "offset" in by_index[2]["message"]
    assert by_index[3]["field"] == "message"
    assert by_index[4]["field"] == "batch"
    assert res.rows == []


_ints = st.integers(-(2**63), 2**63 - 1)  # what orjson decodes
_atoms = st.one_of(
    st.none(), st.booleans(), _ints, st.text(max_size=5),
    st.just("2026-03-01T11:00:00Z"), st.lists(_ints, max_size=2),
    st.dictionaries(st.text(max_size=3), _ints, max_size=2),
)  # fmt: skip
_message = st.one_of(
    _atoms,
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["track", "identify", "page", "Track", "other", 5]),
            "messageId": _atoms, "userId": _atoms, "anonymousId": _atoms, "event": _atoms,
            "properties": _atoms, "timestamp": _atoms, "originalTimestamp": _atoms,
            "context": st.one_of(_atoms, st.fixed_dictionaries({"groupId": _atoms})),
        },
    ),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(_message, max_size=8), st.sampled_from(["", "context.groupId"]), st.booleans())
def test_every_message_is_kept_ignored_or_rejected(
    msgs: list[Any], prop: str, fallback: bool
) -> None:
    res = parse(msgs, CustomerRule.of(prop, fallback))
    rejected = {e["index"] for e in res.errors}
    assert len(res.rows) + res.n_ignored + len(rejected) == len(msgs)
    for e in res.errors:
        assert set(e) == {"index", "field", "message"} and e["message"]
    for ev_id, ev_type, customer, t, props in res.rows:
        assert ev_id and ev_type and customer and isinstance(props, dict)
        assert NOW_MS - LIMITS.max_lateness_ms <= t <= NOW_MS + LIMITS.max_future_ms


@pytest.mark.parametrize(
    ("given_path", "stored"),
    [("$.context.groupId", "context.groupId"), ("properties.account_id", "properties.account_id")],
)
def test_property_paths(given_path: str, stored: str) -> None:
    assert normalize_property(given_path) == stored
    assert SegmentConfigIn(customer_property=given_path).customer_property == stored
    assert SegmentConfigIn(customer_property="  ").customer_property is None


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a b", "a.b.c.d.e.f.g.h.i", "x[0]"])
def test_bad_property_paths(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_property(bad)


def test_webhook_secret_rules() -> None:
    assert WebhookSecretIn().secret is None
    for bad in ("short", " padded-secret-0123456 ", "tab\tsecret-0123456789"):
        with pytest.raises(ValueError):
            WebhookSecretIn(secret=bad)
    with pytest.raises(ValueError):
        WebhookSecretIn(previous_valid_for_s=-1)
