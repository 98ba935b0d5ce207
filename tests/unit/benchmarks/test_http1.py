"""The load generator's HTTP/1.1 client: request targets and reading answers (no sockets: the
answers are fed to a stream reader)."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.http1 import HttpError, Target, _read_answer


def test_target_of_a_url_with_and_without_query() -> None:
    t = Target.of("http://127.0.0.1:8000/v1/events", {"wait": "stored"})
    assert (t.scheme, t.host, t.port, t.target) == (
        "http",
        "127.0.0.1",
        8000,
        "/v1/events?wait=stored",
    )
    assert t.host_header == "127.0.0.1:8000"
    t = Target.of("https://api.example.com/base/v1/events?x=1", {"wait": "broker"})
    assert (t.port, t.target, t.host_header) == (
        443,
        "/base/v1/events?x=1&wait=broker",
        "api.example.com",
    )
    t = Target.of("http://[::1]/v1/events")
    assert (t.host, t.port, t.target, t.host_header) == ("::1", 80, "/v1/events", "[::1]")


@pytest.mark.parametrize("url", ["ftp://h/x", "http:///v1/events", "127.0.0.1:8000/v1/events"])
def test_target_of_refuses_what_it_cannot_reach(url: str) -> None:
    with pytest.raises(ValueError, match="url"):
        Target.of(url)


def _answer(raw: bytes, eof: bool = False) -> tuple[int, dict[str, str], bytes, bool]:
    async def run() -> tuple[int, dict[str, str], bytes, bool]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        if eof:
            reader.feed_eof()
        answer, keep = await _read_answer(reader)
        return answer.status, answer.headers, answer.body, keep

    return asyncio.run(run())


def test_an_answer_with_a_length_keeps_the_connection() -> None:
    status, headers, body, keep = _answer(
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\nRetry-After: 3\r\n\r\n{}HTTP/1.1 ..."
    )
    assert (status, body, keep) == (202, b"{}", True)
    assert headers["retry-after"] == "3"  # names in lower case


def test_a_chunked_answer_with_extensions_and_trailers() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4;ext=1\r\n{"a"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\nX-Trailer: t\r\n\r\n'
    )
    assert _answer(raw)[2:] == (b'{"a": 1}', True)


def test_interim_answers_are_skipped() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n"
    assert _answer(raw)[0] == 503


@pytest.mark.parametrize(
    ("raw", "keep"),
    [
        (b"HTTP/1.1 202 Accepted\r\nConnection: close\r\ncontent-length: 0\r\n\r\n", False),
        (b"HTTP/1.0 202 Accepted\r\ncontent-length: 0\r\n\r\n", False),
        (b"HTTP/1.0 202 Accepted\r\nConnection: keep-alive\r\ncontent-length: 0\r\n\r\n", True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", True),
    ],
)
def test_whether_the_connection_carries_the_next_request(raw: bytes, keep: bool) -> None:
    assert _answer(raw)[3] is keep


def test_an_answer_delimited_by_the_close() -> None:
    assert _answer(b"HTTP/1.1 500 Oops\r\n\r\nbroken", eof=True)[2:] == (b"broken", False)


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"SMTP 220 hello\r\n\r\n", "status line"),
        (b"HTTP/1.1 2x0 Odd\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", "content-length"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nab\r\n", "CRLF"),
        # digits ``str.isdigit`` takes and ``int`` refuses (latin-1 superscripts)
        (b"HTTP/1.1 \xb2\xb2\xb2 Odd\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: \xb9\r\n\r\n", "content-length"),
        # chunk sizes ``int(text, 16)`` would read: a sign, a 0x prefix, an underscore
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-5\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0x5\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1_0\r\n", "chunk size"),
    ],
)
def test_answers_it_cannot_read_are_errors(raw: bytes, what: str) -> None:
    with pytest.raises(HttpError, match=what) as info:
        _answer(raw)
    assert info.value.kind == "bad_answer"


def test_a_cut_answer_is_an_incomplete_read() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        _answer(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", eof=True)
