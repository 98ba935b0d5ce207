"""The load generator's HTTP/1.1 client on real sockets: keep-alive, a connection the server
closed while idle, timeouts and refused connections."""

from __future__ import annotations

import asyncio
import socket

import pytest

from benchmarks.http1 import Connection, HttpError, Target


class _Server:
    """A local HTTP/1.1 server: answers each POST with 202 and the body's length; counts the
    connections; ``close_after`` answers then closes; ``stall`` never answers."""

    def __init__(self, close_after: int = 0, stall: bool = False) -> None:
        self.close_after = close_after
        self.stall = stall
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if self.stall:
                    await asyncio.sleep(3600)
                text = b"%d" % len(body)
                writer.write(
                    b"HTTP/1.1 202 Accepted\r\ncontent-length: %d\r\n\r\n%b" % (len(text), text)
                )
                await writer.drain()
                answered += 1
                if answered == self.close_after:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def _serve(server: _Server) -> tuple[asyncio.Server, str]:
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    return srv, f"http://127.0.0.1:{port}/v1/events"


def test_requests_share_one_connection() -> None:
    async def run() -> None:
        server = _Server()
        srv, url = await _serve(server)
        conn = Connection(Target.of(url, {"wait": "stored"}), {"Authorization": "Bearer k"}, 5)
        for size in (0, 10, 200_000):
            answer = await conn.post(b"x" * size)
            assert (answer.status, answer.body) == (202, b"%d" % size)
        conn.close()
        srv.close()
        assert server.connections == 1
        head = server.requests[0]
        assert head.startswith(b"POST /v1/events?wait=stored HTTP/1.1\r\n")
        assert b"\r\nauthorization: Bearer k\r\n" in head
        assert b"\r\nhost: 127.0.0.1:" in head

    asyncio.run(run())


def test_a_connection_closed_while_idle_is_opened_again() -> None:
    async def run() -> None:
        server = _Server(close_after=1)
        srv, url = await _serve(server)
        conn = Connection(Target.of(url), {}, 5)
        for _ in range(3):
            assert (await conn.post(b"abc")).status == 202
            await asyncio.sleep(0.05)  # the server's close arrives
        conn.close()
        srv.close()
        assert server.connections == 3

    asyncio.run(run())


def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped() -> None:
    async def run() -> None:
        server = _Server(stall=True)
        srv, url = await _serve(server)
        conn = Connection(Target.of(url), {}, 0.3)
        with pytest.raises(TimeoutError):
            await conn.post(b"abc")
        server.stall = False
        assert (await conn.post(b"abcd")).body == b"4"  # on a new connection
        assert server.connections == 2
        conn.close()
        srv.close()

    asyncio.run(run())


def test_a_refused_connection_is_an_error_named_by_its_kind() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def run() -> None:
        conn = Connection(Target.of(f"http://127.0.0.1:{port}/v1/events"), {}, 5)
        with pytest.raises(HttpError) as info:
            await conn.post(b"abc")
        assert info.value.kind == "ConnectionRefusedError"

    asyncio.run(run())
