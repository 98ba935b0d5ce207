from __future__ import annotations

from collections import Counter

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import envelope
from schemas.events import Event
from schemas.timeutil import epoch_ms
from tests.unit.schemas.strategies import property_values


def _ev(i: int, customer: str = "c", eid: str | None = None) -> Event:
    return Event(
        id=eid or f"e{i}",
        type="api.call",
        customer=customer,
        time=1_700_000_000_123 + i,
        properties={"n": i, "s": "x"},
    )


ids = st.text(min_size=1, max_size=12)


@given(st.lists(ids, min_size=1, max_size=300), st.integers(1, 16), st.integers(1, 50))
def test_group_puts_every_event_in_exactly_one_envelope_of_its_partition(
    event_ids: list[str], partitions: int, max_events: int
) -> None:
    events = [_ev(i, eid=eid) for i, eid in enumerate(event_ids)]
    out = envelope.group("tenant-a", 42, events, partitions, max_events)
    seen: Counter[str] = Counter()
    for env in out:
        assert 1 <= len(env.event_ids) <= max_events
        decoded = envelope.decode(env.payload)
        assert decoded.tenant_id == "tenant-a"
        assert decoded.ingested_at_ms == 42
        assert [e.id for e in decoded.events] == list(env.event_ids)
        for e in decoded.events:
            assert envelope.partition_for("tenant-a", e.id, partitions) == env.partition
        seen.update(env.event_ids)
    assert seen == Counter(event_ids)


def test_duplicates_of_an_id_always_share_a_partition() -> None:
    events = [_ev(i, customer=f"c{i}", eid="same-id") for i in range(20)]
    out = envelope.group("t", 1, events, 8)
    assert len({env.partition for env in out}) == 1


def test_partition_depends_on_tenant_and_id() -> None:
    parts = {envelope.partition_for(f"t{i}", "id", 64) for i in range(200)}
    assert len(parts) > 32  # spreads tenants sharing an id


def test_round_trip_keeps_fields_and_ms_time() -> None:
    ev = Event(id="a", type="t", customer="c", time="2026-03-29T01:59:59.999Z", properties={"k": 1})
    (env,) = envelope.group("t", 7, [ev], 1)
    (got,) = envelope.decode(env.payload).events
    assert got == envelope.EnvelopeEvent("a", "t", "c", epoch_ms(ev.time), {"k": 1})


def test_preserves_order_within_a_partition() -> None:
    events = [_ev(i) for i in range(100)]
    out = envelope.group("t", 1, events, 1, max_events=30)
    assert [len(e.event_ids) for e in out] == [30, 30, 30, 10]
    flat = [i for env in out for i in env.event_ids]
    assert flat == [e.id for e in events]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "undecodable"),
        (b"not json", "undecodable"),
        (b"[]", "undecodable"),
        (b'"text"', "undecodable"),
        (b'{"v": 3, "t": "x", "at": 1, "e": []}', "unsupported_version"),
        (
            b'{"v": 3, "t": "x", "at": 1, "i": [], "y": [], "c": [], "m": []}\n{}',
            "unsupported_version",
        ),
        (b'{"v": true, "t": "x", "at": 1, "e": []}', "unsupported_version"),
        (b'{"t": "x", "at": 1, "e": []}', "unsupported_version"),
        (b'{"v": 1, "t": "x"}', "invalid_envelope"),
        (b'{"v": 1, "t": "", "at": 1, "e": []}', "invalid_envelope"),
        (b'{"v": 1, "t": 7, "at": 1, "e": []}', "invalid_envelope"),
        (b'{"v": 1, "t": "x", "at": 1.5, "e": []}', "invalid_envelope"),
        (b'{"v": 1, "t": "x", "at": 1, "e": {}}', "invalid_envelope"),
        (b'{"v": 1, "t": "x", "at": 99999999999999999, "e": []}', "invalid_envelope"),
        (b'{"v": 1, "t": "x", "at": 1, "e": []}\n{}', "undecodable"),  # v1 is one document
        (b'{"v": 2, "t": "x", "at": 1, "e": []}', "invalid_envelope"),
        (b'{"v": 2, "t": "x", "at": 1, "i": [], "y": [], "c": []}', "invalid_envelope"),
        (b'{"v": 2, "t": "x", "at": 1, "i": [], "y": [], "c": [], "m": {}}', "invalid_envelope"),
        (b'{"v": 2, "t": "", "at": 1, "i": [], "y": [], "c": [], "m": []}', "invalid_envelope"),
        # one value per event in every column and one property line per event
        (
            b'{"v": 2, "t": "x", "at": 1, "i": ["a"], "y": ["t"], "c": ["c"], "m": [1]}',
            "invalid_envelope",
        ),
        (
            b'{"v": 2, "t": "x", "at": 1, "i": ["a"], "y": ["t"], "c": [], "m": [1]}\n{}',
            "invalid_envelope",
        ),
        (
            b'{"v": 2, "t": "x", "at": 1, "i": ["a"], "y": ["t"], "c": ["c"], "m": [1]}\n{}\n{}',
            "invalid_envelope",
        ),
        (
            b'{"v": 2, "t": "x", "at": 1, "i": ["a"], "y": ["t"], "c": ["c"], "m": [1]}\n{}\n',
            "invalid_envelope",
        ),
        (b'{"v": 2, "t": "x", "at": 1, "i": [], "y": [], "c": [], "m": []}\n', "invalid_envelope"),
        (b'{"v": 2, "t": "x"\n, "at": 1, "i": [], "y": [], "c": [], "m": []}', "invalid_envelope"),
    ],
)
def test_decode_rejects_poison_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(envelope.EnvelopeError) as info:
        envelope.decode(payload)
    assert info.value.reason == reason
    if b'"t": "x"' in payload and reason != "undecodable":
        assert info.value.tenant_id == "x"


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (["only-id"], "an event row must be an array"),
        ("e1", "an event row must be an array"),
        ([1, "t", "c", 5, {}], "id must be a string"),
        (["", "t", "c", 5, {}], "id must not be empty"),
        (["i" * 257, "t", "c", 5, {}], "id is longer than 256"),
        (["i", None, "c", 5, {}], "type must be a string"),
        (["i", "t", ["c"], 5, {}], "customer must be a string"),
        (["i", "t", "c", "5", {}], "time must be integer epoch milliseconds"),
        (["i", "t", "c", 5.0, {}], "time must be integer epoch milliseconds"),
        (["i", "t", "c", True, {}], "time must be integer epoch milliseconds"),
        (["i", "t", "c", -(10**13), {}], "outside the store's range"),
        (["i", "t", "c", 10**14, {}], "outside the store's range"),
        (["i", "t", "c", 5, []], "properties must be an object"),
    ],
)
def test_a_bad_event_is_left_out_and_its_neighbours_kept(row: object, problem: str) -> None:
    payload = orjson.dumps(
        {"v": 1, "t": "x", "at": 9, "e": [["a", "t", "c", 1, {}], row, ["b", "t", "c", 2, {}]]}
    )
    env = envelope.decode(payload)
    assert [e.id for e in env.events] == ["a", "b"]
    assert env.positions == (0, 2)
    (rej,) = env.rejected
    assert rej.index == 1 and rej.row == row and problem in rej.problem
    # the worker's columnar decoding (columns checked at once) leaves out the same row
    cols = envelope.decode_columns(payload)
    assert cols.ids == ["a", "b"] and cols.positions == (0, 2)
    assert cols.rejected == env.rejected


def _v2(rows: list[list[object]], lines: list[bytes] | None = None) -> bytes:
    """A version 2 envelope of tenant x written by hand (columns and property lines)."""
    head = orjson.dumps(
        {"v": 2, "t": "x", "at": 9, **{k: [r[j] for r in rows] for j, k in enumerate("iycm")}}
    )
    if lines is None:
        lines = [orjson.dumps(r[4]) for r in rows]
    return head + b"".join(b"\n" + line for line in lines)


@pytest.mark.parametrize(
    ("row", "line", "problem"),
    [
        ([1, "t", "c", 5, {}], None, "id must be a string"),
        (["", "t", "c", 5, {}], None, "id must not be empty"),
        (["i" * 257, "t", "c", 5, {}], None, "id is longer than 256"),
        (["i", None, "c", 5, {}], None, "type must be a string"),
        (["i", "t", ["c"], 5, {}], None, "customer must be a string"),
        (["i", "t", "c", 5.0, {}], None, "time must be integer epoch milliseconds"),
        (["i", "t", "c", True, {}], None, "time must be integer epoch milliseconds"),
        (["i", "t", "c", 10**14, {}], None, "outside the store's range"),
        (["i", "t", "c", 5, []], None, "properties must be an object, got array"),
        (["i", "t", "c", 5, {}], b"not json", "properties must be an object, got string"),
        (["i", "t", "c", 5, {}], b"", "properties must be an object, got string"),
        (["i", "t", "c", 5, {}], b"1,2", "properties must be an object, got string"),
        (["i", "t", "c", 5, {}], b'{"a":1},{"b":2}', "properties must be an object, got string"),
        (["i", "t", "c", 5, {}], b"7", "properties must be an object, got number"),
    ],
)
def test_version_2_a_bad_event_is_left_out_and_its_neighbours_kept(
    row: list[object], line: bytes | None, problem: str
) -> None:
    rows = [["a", "t", "c", 1, {"k": 1}], row, ["b", "t", "c", 2, {}]]
    lines = [orjson.dumps(r[4]) for r in rows]
    if line is not None:
        lines[1] = line
    payload = _v2(rows, lines)
    env = envelope.decode(payload)
    assert [e.id for e in env.events] == ["a", "b"]
    assert [e.properties for e in env.events] == [{"k": 1}, {}]
    assert env.positions == (0, 2)
    (rej,) = env.rejected
    assert rej.index == 1 and problem in rej.problem
    assert rej.row[:4] == row[:4]
    cols = envelope.decode_columns(payload)
    assert cols.ids == ["a", "b"] and cols.positions == (0, 2)
    assert cols.rejected == env.rejected
    assert cols.property_texts == [b'{"k":1}', b"{}"]


def test_version_1_over_several_lines_is_read() -> None:
    payload = b'{"v": 1, "t": "x", "at": 9,\n "e": [["a", "t", "c", 1, {"k": 1}]]}\n'
    (ev,) = envelope.decode(payload).events
    assert ev == envelope.EnvelopeEvent("a", "t", "c", 1, {"k": 1})
    cols = envelope.decode_columns(payload)
    assert cols.ids == ["a"] and cols.property_texts is None


def test_version_2_property_lines_are_kept_as_written() -> None:
    rows = [["a", "t", "c", 1, {"k": 1}], ["b", "t", "c", 2, {}]]
    payload = _v2(rows, [b' { "k" : 1 } ', b"{}"])
    cols = envelope.decode_columns(payload)
    assert cols.properties == [{"k": 1}, {}]
    assert cols.property_texts == [b' { "k" : 1 } ', b"{}"]


def test_a_good_envelope_has_no_positions() -> None:
    env = envelope.decode(b'{"v": 1, "t": "x", "at": 9, "e": [["a", "t", "c", 1, {}]]}')
    assert env.rejected == () and env.positions is None


rows = st.lists(
    st.tuples(
        ids,
        st.sampled_from(["a", "b"]),
        st.text(min_size=1, max_size=5),
        st.integers(0, 4_102_444_800_000),
        st.dictionaries(st.text(max_size=4), st.integers(-(2**63), 2**63 - 1), max_size=2),
    ),
    max_size=60,
)


@given(rows, st.integers(1, 9), st.integers(1, 7))
def test_group_rows_round_trips_wire_rows(
    wire: list[envelope.Row], partitions: int, max_events: int
) -> None:
    out = envelope.group_rows("t", 5, wire, partitions, max_events)
    back = []
    for env in out:
        for e in envelope.decode(env.payload).events:
            assert envelope.partition_for("t", e.id, partitions) == env.partition
            back.append((e.id, e.type, e.customer, e.time_ms, e.properties))
    assert sorted(back, key=repr) == sorted(wire, key=repr)


@given(rows, st.integers(1, 9), st.integers(1, 7))
def test_group_columns_keeps_each_partitions_order(
    wire: list[envelope.Row], partitions: int, max_events: int
) -> None:
    """Envelopes in ascending partition order, at most ``max_events`` events each, a partition's
    events in input order; ``group_rows`` of the same rows writes the same envelopes."""
    cols = envelope.EventColumns.of_rows(wire)
    assert len(cols) == len(wire) and cols.rows() == wire
    assert [cols.row(i) for i in range(len(cols))] == wire
    out = envelope.group_columns("t", 5, cols, partitions, max_events)
    assert out == envelope.group_rows("t", 5, wire, partitions, max_events)
    assert [e.partition for e in out] == sorted(e.partition for e in out)
    for part in {e.partition for e in out}:
        expected = [r for r in wire if envelope.partition_for("t", r[0], partitions) == part]
        envs = [e for e in out if e.partition == part]
        assert all(0 < len(e.event_ids) <= max_events for e in envs)
        got = [
            (x.id, x.type, x.customer, x.time_ms, x.properties)
            for e in envs
            for x in envelope.decode(e.payload).events
        ]
        assert got == expected


@given(rows, st.data())
def test_event_columns_take_and_slice(wire: list[envelope.Row], data: st.DataObject) -> None:
    cols = envelope.EventColumns.of_rows(wire)
    positions = data.draw(st.lists(st.integers(0, max(len(wire) - 1, 0)), max_size=10))
    if wire:
        assert cols.take(positions).rows() == [wire[i] for i in positions]
    start, stop = sorted(data.draw(st.tuples(st.integers(0, 70), st.integers(0, 70))))
    assert cols.slice(start, stop).rows() == wire[start:stop]


@given(rows, st.integers(1, 7))
def test_version_2_decodes_to_what_version_1_of_the_same_rows_does(
    wire: list[envelope.Row], max_events: int
) -> None:
    for env in envelope.group_rows("t", 5, wire, 1, max_events):
        assert env.payload.startswith(b'{"v":2,')
        v2 = envelope.decode(env.payload)
        n = len(v2.events)
        v1_rows = [[e.id, e.type, e.customer, e.time_ms, e.properties] for e in v2.events]
        assert envelope.decode(envelope.payload_v1("t", 5, v1_rows)) == v2
        cols = envelope.decode_columns(env.payload)
        assert [cols.event(i) for i in range(len(cols))] == v2.events
        assert cols.property_texts == [orjson.dumps(e.properties) for e in v2.events]
        assert len(cols) == n == len(env.event_ids)


def test_an_empty_version_2_envelope_has_no_property_lines() -> None:
    (env,) = [envelope.OutgoingEnvelope(0, envelope.encode("t", 5, []), ())]
    assert b"\n" not in env.payload
    cols = envelope.decode_columns(env.payload)
    assert len(cols) == 0 and cols.property_texts == []


@given(st.lists(st.dictionaries(st.text(max_size=5), property_values, max_size=5), max_size=20))
def test_property_lines_are_one_dumps_per_object(objs: list[dict[str, object]]) -> None:
    assert b"\n".join(envelope.json_texts(objs)) == b"\n".join(orjson.dumps(o) for o in objs)
    assert envelope.json_texts(objs) == [orjson.dumps(o) for o in objs]


def test_property_lines_with_the_separator_inside_a_property() -> None:
    objs = [{"a": [1, envelope._SEP, 2]}, {"b": envelope._SEP}, {}, {"c": [envelope._SEP]}]
    assert b"\n".join(envelope.json_texts(objs)) == b"\n".join(orjson.dumps(o) for o in objs)
    assert envelope.json_texts(objs) == [orjson.dumps(o) for o in objs]


def _nested(levels: int) -> dict[str, object]:
    obj: dict[str, object] = {}
    for _ in range(levels - 1):
        obj = {"a": obj}
    return obj


@pytest.mark.parametrize("neighbours", [0, 1])
def test_the_encoder_refuses_properties_nested_past_the_ingest_limit(neighbours: int) -> None:
    """Properties nested up to ``api.ingest.MAX_NESTING`` levels are written; one more is
    refused, as version 1 did (the API answers 400 naming those events)."""
    from api.ingest import MAX_NESTING

    rest = [("j", "t", "c", 1, {})] * neighbours
    (env,) = envelope.group_rows("t", 1, [("i", "t", "c", 1, _nested(MAX_NESTING)), *rest], 1)
    assert envelope.decode(env.payload).events[0].properties == _nested(MAX_NESTING)
    with pytest.raises(orjson.JSONEncodeError):
        envelope.group_rows("t", 1, [("i", "t", "c", 1, _nested(MAX_NESTING + 1)), *rest], 1)
