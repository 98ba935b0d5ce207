"""Hypothesis fuzz of the worker's decode path (pure: the processor on an in-memory sink).

Whatever a message holds -- random bytes, any JSON, envelopes with fields of every wrong type,
rows mixing good and bad events, control messages with broken JSON, versions or meters -- the
worker's ``BatchProcessor.add`` + ``flush`` never raises, the partition advances past it, and the
dead letters are exactly those an independent classifier (written here, from the wire format in
docs/architecture.md, not from schemas.envelope) predicts, for envelopes of both wire versions,, with the same reason and position.
The good events of a message are stored; nothing else is.

Also: what the API's event and CloudEvents decoders accept (``api.ingest_parse``), once grouped
into envelopes, is decoded by the worker without a single dead letter (the two sides agree).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.ingest_parse import Limits, parse_cloudevents, parse_native
from schemas.control import CONTROL_PREFIX, CONTROL_VERSION, encode_activate
from schemas.envelope import EnvelopeColumns, EnvelopeError, decode, decode_columns, group_rows
from streams.dedupe import DedupeIndex
from streams.processor import BatchProcessor
from tally.errors import TallyError
from tests.unit.streams.fakes import MemorySink, meter

TOPIC = "tally.events"
MS_MIN = -2_208_988_800_000  # 1900-01-01
MS_MAX = 10_413_792_000_000 - 1  # before 2300-01-01
NOW = 1_750_000_000_000
ID_MAX = 256
TENANT_MAX = 64

# --- the independent classifier ---------------------------------------------------------------


def _text_ok(v: Any, most: int = ID_MAX) -> bool:
    return type(v) is str and 0 < len(v) <= most


def row_ok(row: Any) -> bool:
    """A wire row [id, type, customer, time_ms, properties] the store can hold."""
    return (
        type(row) is list
        and len(row) == 5
        and all(_text_ok(v) for v in row[:3])
        and type(row[3]) is int
        and MS_MIN <= row[3] <= MS_MAX
        and type(row[4]) is dict
    )


def expected(payload: bytes | None) -> tuple[list[tuple[int, str]], list[str]]:
    """(dead letters as (index, reason), ids of the events stored) for one message."""
    if not payload:
        return [(-1, "empty_message")], []
    if payload.startswith(CONTROL_PREFIX):
        try:
            doc = orjson.loads(payload[len(CONTROL_PREFIX) :])
        except orjson.JSONDecodeError:
            return [(-1, "undecodable")], []
        if not isinstance(doc, dict):
            return [(-1, "undecodable")], []
        if type(doc.get("v")) is not int or doc["v"] != CONTROL_VERSION:
            return [(-1, "unsupported_version")], []
        if doc.get("kind") != "activate_meter" or not isinstance(doc.get("meter"), dict):
            return [(-1, "invalid_control")], []
        return [], []  # the generator only writes valid meters otherwise (see _control)
    head, newline, tail = payload.partition(b"\n")
    try:  # version 2: a header line (then property lines); version 1: one document
        doc = orjson.loads(head)
        lines: list[bytes] | None = tail.split(b"\n") if newline else []
        if isinstance(doc, dict) and doc.get("v") == 1 and newline:
            raise ValueError("version 1 is one document")
    except (orjson.JSONDecodeError, ValueError):
        try:
            doc = orjson.loads(payload)
            lines = None
        except orjson.JSONDecodeError:
            return [(-1, "undecodable")], []
    if not isinstance(doc, dict):
        return [(-1, "undecodable")], []
    if type(doc.get("v")) is not int or doc["v"] not in (1, 2):
        return [(-1, "unsupported_version")], []
    if not _text_ok(doc.get("t"), TENANT_MAX):
        return [(-1, "invalid_envelope")], []
    at = doc.get("at")
    if type(at) is not int or not MS_MIN <= at <= MS_MAX:
        return [(-1, "invalid_envelope")], []
    if doc["v"] == 2:
        if lines is None:
            return [(-1, "invalid_envelope")], []  # a version 2 header is one line
        cols = [doc.get(k) for k in ("i", "y", "c", "m")]
        if not all(type(c) is list for c in cols):
            return [(-1, "invalid_envelope")], []
        if len({len(c) for c in cols} | {len(lines)}) != 1:
            return [(-1, "invalid_envelope")], []
        event_rows = [
            [*r, _line_value(line)] for r, line in zip(zip(*cols, strict=True), lines, strict=True)
        ]
    elif type(doc.get("e")) is not list:
        return [(-1, "invalid_envelope")], []
    else:
        event_rows = doc["e"]
    bad = [(i, "invalid_event") for i, r in enumerate(event_rows) if not row_ok(r)]
    good = [r[0] for r in event_rows if row_ok(r)]
    return bad, good


def _line_value(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return None  # not an object: the event is bad


def tenant_of(payload: bytes) -> str:
    head = payload.partition(b"\n")[0]
    try:
        return str(orjson.loads(head)["t"])
    except orjson.JSONDecodeError:
        return str(orjson.loads(payload)["t"])


# --- generators -------------------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
good_text = st.text(min_size=1, max_size=12)
near_text = st.one_of(good_text, st.just(""), st.just("x" * (ID_MAX + 1)), json_value)
good_time = st.integers(min_value=MS_MIN, max_value=MS_MAX)
near_time = st.one_of(
    good_time,
    st.sampled_from([MS_MIN - 1, MS_MAX + 1, 2**63 - 1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    json_value,
)
good_props = st.dictionaries(st.text(max_size=5), json_value, max_size=3)


@st.composite
def rows(draw: st.DrawFn, eid: str) -> Any:
    """A wire row: mostly well formed, sometimes with one field of a wrong type or range, a
    wrong length or not an array at all."""
    row = [eid, draw(good_text), draw(good_text), draw(good_time), draw(good_props)]
    how = draw(st.integers(0, 9))
    if how == 0:
        row[draw(st.integers(0, 2))] = draw(near_text)
    elif how == 1:
        row[3] = draw(near_time)
    elif how == 2:
        row[4] = draw(json_value)
    elif how == 3:
        return draw(st.one_of(json_value, st.just(row[:4]), st.just([*row, 1])))
    return row


@st.composite
def envelopes(draw: st.DrawFn, n: int) -> bytes:
    doc: dict[str, Any] = {
        "v": 1,
        "t": draw(st.sampled_from(["t1", "t2"])),
        "at": draw(good_time),
        "e": [draw(rows(f"m{n}-e{i}")) for i in range(draw(st.integers(0, 4)))],
    }
    how = draw(st.integers(0, 7))
    if how == 0:
        doc["v"] = draw(st.one_of(st.integers(2, 9), st.just(True), st.just(1.0), json_value))
    elif how == 1:
        doc["t"] = draw(st.one_of(st.just(""), st.just("t" * 65), json_value))
    elif how == 2:
        doc["at"] = draw(near_time)
    elif how == 3:
        doc["e"] = draw(json_value)
    elif how == 4:
        del doc[draw(st.sampled_from(["v", "t", "at", "e"]))]
    if draw(st.booleans()):
        return orjson.dumps(doc)
    return _version_2(draw, doc)


def _version_2(draw: st.DrawFn, doc: dict[str, Any]) -> bytes:
    """``doc`` as a version 2 envelope: its 5-value rows as columns and property lines (other
    rows as they are in one column), with some lines or columns too many or too few and some
    lines that are not JSON."""
    if type(doc.get("v")) is int and doc["v"] == 1:
        doc["v"] = 2
    rows = doc.pop("e", [])
    rows = rows if type(rows) is list else []
    rows = [r if type(r) is list and len(r) == 5 else [r, "t", "c", 1, {}] for r in rows]
    for j, key in enumerate(("i", "y", "c", "m")):
        doc[key] = [r[j] for r in rows]
    lines = [orjson.dumps(r[4]) for r in rows]
    how = draw(st.integers(0, 9))
    if how == 0 and lines:
        lines[draw(st.integers(0, len(lines) - 1))] = draw(
            st.sampled_from([b"", b"not json", b"1,2", b'{"a":1},{"b":2}', b"[1]", b'"{}"'])
        )
    elif how == 1:
        lines.append(b"{}")
    elif how == 2 and lines:
        lines.pop()
    elif how == 3:
        key = draw(st.sampled_from(["i", "y", "c", "m"]))
        doc[key] = draw(st.one_of(json_value, st.just([*doc[key], "x"])))
    head = orjson.dumps(doc)
    return head + b"".join(b"\n" + line for line in lines)


@st.composite
def controls(draw: st.DrawFn, n: int) -> bytes:
    how = draw(st.integers(0, 4))
    if how == 0:
        return CONTROL_PREFIX + draw(st.binary(max_size=20))
    if how == 1:
        return CONTROL_PREFIX + orjson.dumps(draw(json_value))
    if how == 2:
        doc = {"v": draw(st.integers(2, 5)), "kind": "activate_meter", "meter": {}}
        return CONTROL_PREFIX + orjson.dumps(doc)
    if how == 3:
        doc = {"v": CONTROL_VERSION, "kind": draw(st.text(max_size=6)), "meter": {"x": 1}}
        return CONTROL_PREFIX + orjson.dumps(doc)
    return encode_activate(
        meter(f"c{n}", meter_id=f"id-c{n}", tenant_id="t1", activation_topic=TOPIC)
    )


@st.composite
def messages(draw: st.DrawFn) -> list[bytes | None]:
    out: list[bytes | None] = []
    for n in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            out.append(draw(st.one_of(st.none(), st.just(b""))))
        elif kind == 1:
            out.append(draw(st.binary(min_size=1, max_size=40)))
        elif kind == 2:
            out.append(orjson.dumps(draw(json_value)))
        elif kind == 3:
            out.append(draw(controls(n)))
        else:
            out.append(draw(envelopes(n)))
    return out


# --- the worker's decode path -----------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages(), st.integers(0, 3))
def test_worker_never_raises_and_dead_letters_every_bad_message(
    msgs: list[bytes | None], partition: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sink = MemorySink([meter()])
        indexes: dict[int, DedupeIndex] = {}

        def index_for(p: int) -> DedupeIndex:
            if p not in indexes:
                indexes[p] = DedupeIndex.open(Path(tmp), TOPIC, p)
            return indexes[p]

        proc = BatchProcessor(TOPIC, sink, index_for, clock_ms=lambda: NOW)
        proc.assign(partition, -1)
        want_dead: set[tuple[int, int, str]] = set()
        want_ids: set[tuple[str, str]] = set()
        for offset, payload in enumerate(msgs):
            assert proc.add(partition, offset, payload, timestamp_ms=NOW)
            dead, good = expected(payload)
            want_dead |= {(offset, index, reason) for index, reason in dead}
            if good:
                tenant = tenant_of(payload or b"")
                want_ids |= {(tenant, eid) for eid in good}
        assert proc.flush() == {partition: len(msgs) - 1}  # never blocked
        for idx in indexes.values():
            idx.close()
    got = {(r[6], r[7], r[2]) for r in sink.dead_letters.values()}
    assert got == want_dead
    for r in sink.dead_letters.values():
        assert (r[4], r[5]) == (TOPIC, partition)  # the source position
        assert r[2] in ("invalid_event",) or r[7] == -1
    assert set(sink.events) == want_ids
    assert sink.progress(TOPIC) == {partition: len(msgs) - 1}


# --- the API's decoders and the worker agree --------------------------------------------------

LIMITS = Limits(max_events=50, max_lateness_ms=35 * 86_400_000, max_future_ms=300_000)
event_time = st.one_of(
    st.none(),
    st.integers(min_value=NOW - 40 * 86_400_000, max_value=NOW + 400_000),
    st.sampled_from(
        ["2025-06-15T10:00:00Z", "2025-06-15T10:00:00.123+02:00", "2025-06-15", "yesterday"]
    ),
    json_value,
)


@st.composite
def native_items(draw: st.DrawFn) -> Any:
    item: dict[str, Any] = {
        "id": draw(near_text),
        "type": draw(near_text),
        "customer": draw(near_text),
    }
    if draw(st.booleans()):
        item["time"] = draw(event_time)
    if draw(st.booleans()):
        item["properties"] = draw(st.one_of(good_props, json_value))
    if draw(st.integers(0, 5)) == 0:
        item[draw(st.text(max_size=5))] = draw(json_value)
    return draw(st.one_of(st.just(item), json_value)) if draw(st.integers(0, 6)) == 0 else item


@st.composite
def cloud_items(draw: st.DrawFn) -> Any:
    item: dict[str, Any] = {
        "id": draw(near_text),
        "source": draw(near_text),
        "specversion": draw(st.sampled_from(["1.0", "0.3", "", 1])),
        "type": draw(near_text),
        "subject": draw(near_text),
    }
    if draw(st.booleans()):
        item["time"] = draw(event_time)
    if draw(st.booleans()):
        item["data"] = draw(st.one_of(good_props, json_value))
    if draw(st.booleans()):
        del item[draw(st.sampled_from(list(item)))]
    return item


def _agree(rows: list[Any]) -> None:
    for env in group_rows("t1", NOW, rows, 4, 7):
        decoded = decode(env.payload)
        assert decoded.rejected == (), decoded.rejected
        assert [e.id for e in decoded.events] == list(env.event_ids)


@settings(max_examples=200, deadline=None)
@given(st.lists(native_items(), min_size=1, max_size=8))
def test_native_decoder_never_raises_and_its_events_reach_the_worker_intact(
    items: list[Any],
) -> None:
    try:
        res = parse_native(items, NOW, LIMITS)
    except TallyError:
        return  # a clear client error (400/413 naming the field)
    assert len(res.rows) + len(res.rejected_indexes) == len(items)
    for e in res.errors:
        assert isinstance(e["field"], str) and isinstance(e["message"], str)
    _agree(res.rows)


@settings(max_examples=200, deadline=None)
@given(st.lists(cloud_items(), min_size=1, max_size=8))
def test_cloudevents_decoder_never_raises_and_its_events_reach_the_worker_intact(
    items: list[Any],
) -> None:
    try:
        res = parse_cloudevents(items, NOW, LIMITS)
    except TallyError:
        return
    assert len(res.rows) + len(res.rejected_indexes) == len(items)
    _agree(res.rows)


# --- the worker's columnar decoder agrees with the per-event one --------------------------------


def _decoded(fn: Any, payload: bytes) -> Any:
    try:
        return fn(payload)
    except EnvelopeError as exc:
        return ("error", str(exc), exc.reason, exc.tenant_id)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 6).flatmap(envelopes))
def test_columnar_decode_accepts_and_rejects_exactly_as_decode(payload: bytes) -> None:
    """``decode_columns`` (the worker's hot path) keeps the same events in the same order, the
    same rejected rows with the same problems and positions, and fails with the same error."""
    want = _decoded(decode, payload)
    got = _decoded(decode_columns, payload)
    if isinstance(want, tuple):
        assert got == want
        return
    assert isinstance(got, EnvelopeColumns)
    assert (got.tenant_id, got.ingested_at_ms) == (want.tenant_id, want.ingested_at_ms)
    assert [got.event(i) for i in range(len(got))] == want.events
    assert got.rejected == want.rejected
    assert got.positions == want.positions
