"""Topic generations and the control-message codec (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.control import (
    CONTROL_PREFIX,
    ActivateMeter,
    ControlError,
    decode_control,
    encode_activate,
    is_control,
)
from schemas.envelope import decode, group
from schemas.events import Event
from schemas.meters import Meter, MeterStatus
from schemas.topics import generation_topic, topic_generation, topic_order


def test_generation_of_topics() -> None:
    assert generation_topic("tally.events", 1_700_000_000_123) == "tally.events.g1700000000123"
    assert topic_generation("tally.events.g1700000000123") == 1_700_000_000_123
    assert topic_generation("tally.events") == 0  # scale-out's fixed topic
    assert topic_generation("tally.events.gx") == 0
    assert topic_generation("tally.events.g12.x") == 0
    assert topic_generation("") == -1  # no activation topic: before everything


def test_topic_order_is_total_and_generation_first() -> None:
    g1, g2 = "tally.events.g1000", "tally.events.g2000"
    assert topic_order("") < topic_order("tally.events") < topic_order(g1) < topic_order(g2)
    assert topic_order("other.g1000") < topic_order(g1)  # same generation: by name
    assert topic_order("z.g999") < topic_order("a.g1000")


@given(st.text(max_size=30), st.text(max_size=30))
def test_order_of_two_different_topics_is_never_equal(a: str, b: str) -> None:
    if a != b:
        assert topic_order(a) != topic_order(b)


def meter(**kw: object) -> Meter:
    data: dict[str, object] = dict(
        slug="tokens",
        event_type="llm",
        aggregation="sum",
        value_property="$.tokens",
        group_by={"model": "$.model"},
        filters=[{"property": "$.env", "op": "ne", "value": "test"}],
        id="m1",
        tenant_id="t1",
        created_at=datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC),
        status=MeterStatus.PENDING,
        activation_topic="tally.events.g5",
    )
    data.update(kw)
    return Meter.model_validate(data)


def test_activate_marker_round_trip() -> None:
    m = meter()
    payload = encode_activate(m)
    assert payload.startswith(CONTROL_PREFIX) and is_control(payload)
    assert decode_control(payload) == ActivateMeter(m)


def test_envelopes_are_never_control_messages() -> None:
    ev = Event(id="e1", type="llm", customer="c", time=datetime.now(UTC), properties={})
    (env,) = group("t1", 1, [ev], 4)
    assert not is_control(env.payload)
    assert decode(env.payload).events[0].id == "e1"
    assert not is_control(b"\x00garbage") and not is_control(b"") and not is_control(b"{}")
    with pytest.raises(ControlError, match="not a control message"):
        decode_control(b'{"v": 1}')


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"not json", "undecodable"),
        (b"[1]", "JSON object"),
        (orjson.dumps({"v": 2, "kind": "activate_meter"}), "version"),
        (orjson.dumps({"v": 1, "kind": "drop_tables"}), "unknown control message kind"),
        (orjson.dumps({"v": 1, "kind": "activate_meter", "meter": {"slug": "x"}}), "bad meter"),
        (
            orjson.dumps(
                {
                    "v": 1,
                    "kind": "activate_meter",
                    "meter": meter(activation_topic="").model_dump(mode="json"),
                }
            ),
            "no activation_topic",
        ),
    ],
)
def test_bad_control_messages_raise(body: bytes, needle: str) -> None:
    with pytest.raises(ControlError, match=needle):
        decode_control(CONTROL_PREFIX + body)
