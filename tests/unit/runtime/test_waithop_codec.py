"""The wait hop's framing (runtime.waithop): newline-delimited JSON, decoded back exactly, split
anywhere by the socket; anything malformed is refused with a reason (the connection is then
dropped and its waits fail with 503, never hang)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.waithop import (
    Answer,
    LineBuffer,
    Want,
    decode_answer,
    decode_want,
    encode_answer,
    encode_error,
    encode_want,
)

ids = st.integers(min_value=0, max_value=2**62)
offsets = st.dictionaries(
    st.integers(min_value=0, max_value=10_000), st.integers(min_value=-1, max_value=2**62)
)
topics = st.text(min_size=1, max_size=40)
timeouts = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@given(ids, topics, offsets, timeouts)
def test_want_round_trips(wid: int, topic: str, targets: dict[int, int], timeout: float) -> None:
    line = encode_want(wid, topic, targets, timeout)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_want(line[:-1]) == Want(wid, topic, targets, timeout)


@given(ids, st.booleans())
def test_answer_round_trips(wid: int, stored: bool) -> None:
    line = encode_answer(wid, stored)
    assert line.count(b"\n") == 1
    assert decode_answer(line[:-1]) == Answer(wid, stored)


@given(ids, st.text())
def test_error_round_trips(wid: int, message: str) -> None:
    line = encode_error(wid, message)
    assert line.count(b"\n") == 1
    assert decode_answer(line[:-1]) == Answer(wid, None, message)


@given(
    st.lists(st.tuples(ids, topics, offsets, timeouts), max_size=20),
    st.lists(st.integers(min_value=1, max_value=50), max_size=40),
)
def test_lines_come_back_whole_however_the_stream_is_cut(
    wants: list[tuple[int, str, dict[int, int], float]], cuts: list[int]
) -> None:
    stream = b"".join(encode_want(*w) for w in wants)
    buf = LineBuffer()
    got: list[Want] = []
    pos = 0
    for cut in cuts:
        got.extend(decode_want(line) for line in buf.feed(stream[pos : pos + cut]))
        pos += cut
    got.extend(decode_want(line) for line in buf.feed(stream[pos:]))
    assert got == [Want(*w) for w in wants]


def test_an_endless_line_is_refused() -> None:
    buf = LineBuffer(max_line=100)
    assert buf.feed(b"x" * 100) == []
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        buf.feed(b"x")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"id":1,"topic":"","targets":[],"timeout":1}', "topic"),
        (b'{"id":1,"topic":"t","targets":[],"timeout":"1"}', "timeout"),
        (b'{"id":1,"topic":"t","targets":[],"timeout":-1}', "timeout"),
        (b'{"id":1,"topic":"t","targets":[],"timeout":true}', "timeout"),
        (b'{"id":1,"topic":"t","targets":{"0":1},"timeout":1}', "targets"),
        (b'{"id":1,"topic":"t","targets":[[0]],"timeout":1}', "pair"),
        (b'{"id":1,"topic":"t","targets":[[0,"5"]],"timeout":1}', "offset"),
        (b'{"id":1.5,"topic":"t","targets":[],"timeout":1}', "id"),
        (b'{"topic":"t","targets":[],"timeout":1}', "id"),
    ],
)
def test_malformed_wants_are_refused_with_a_reason(line: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_want(line)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"nope", "not JSON"),
        (b"3", "JSON object"),
        (b'{"id":1}', "stored"),
        (b'{"id":1,"stored":1}', "stored"),
        (b'{"id":"1","stored":true}', "id"),
    ],
)
def test_malformed_answers_are_refused_with_a_reason(line: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_answer(line)
