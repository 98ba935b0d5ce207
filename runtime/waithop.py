"""The ``wait=stored`` hop of `tally run` split mode: the API child waiting on the main
process's ``ProgressBoard`` over one persistent UNIX-domain connection.

Before this, every waiting request was one HTTP ``POST /wait`` through httpx into the main
process's Starlette control app: 8-12 % of Tally's samples under load went into that hop.

Protocol: newline-delimited JSON (orjson), many waits multiplexed on one connection::

    child -> main   {"id": 7, "topic": "events", "targets": [[0, 1041], [3, 88]], "timeout": 10.0}
    main -> child   {"id": 7, "stored": true}        (or false at the timeout)
    main -> child   {"id": 7, "error": "<text>"}     (the board failed: the child answers 503)

The main side (``WaitServer``, its own small thread and event loop, never the worker's) answers a
``want`` with ``ProgressBoard.wait_for``: the same semantics as in one process -- the waiting
request wakes the worker's flush, the answer is true as soon as every partition's stored offset
reaches its target and false at the timeout. Answers may come in any order.

The child side (``SocketProgressWaiter``) keeps one connection per event loop (uvicorn's). A
lost connection (the main process stopping, restarting or killed) fails every pending wait at
once with ``tally.errors.Unavailable`` (the events are accepted; the client may retry); the next
wait connects again. A main process that accepts but never answers cannot hang a request either:
each wait gives up ``ANSWER_GRACE_S`` after its own timeout, also with ``Unavailable``.

The address is a Linux abstract socket name (``@name``: no file to clean up after a kill -9, no
path-length limit) or a filesystem path elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import threading
from typing import Any, NamedTuple, cast

import orjson

from tally.errors import TallyError, Unavailable

log = logging.getLogger(__name__)

ANSWER_GRACE_S = 10.0  # a wait gives up this long after its own timeout (a hung main process)
CONNECT_TIMEOUT_S = 5.0
MAX_LINE = 1 << 20  # a longer message is a broken peer: the connection is dropped


# ---- the codec (no I/O) -------------------------------------------------------------------------


class Want(NamedTuple):
    id: int
    topic: str
    targets: dict[int, int]
    timeout: float


class Answer(NamedTuple):
    id: int
    stored: bool | None  # None when ``error`` is set
    error: str | None = None


def encode_want(wid: int, topic: str, targets: dict[int, int], timeout: float) -> bytes:
    return (
        orjson.dumps(
            {"id": wid, "topic": topic, "targets": list(targets.items()), "timeout": timeout}
        )
        + b"\n"
    )


def encode_answer(wid: int, stored: bool) -> bytes:
    return b'{"id":%d,"stored":%s}\n' % (wid, b"true" if stored else b"false")


def encode_error(wid: int, message: str) -> bytes:
    return orjson.dumps({"id": wid, "error": message}) + b"\n"


def _int(value: Any, name: str) -> int:
    if type(value) is not int:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _object(line: bytes, what: str) -> dict[str, Any]:
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{what} must be a JSON object")
    return doc


def decode_want(line: bytes) -> Want:
    """One ``want`` line (without its newline). ``ValueError`` names what is wrong."""
    doc = _object(line, "a want")
    topic = doc.get("topic")
    if not isinstance(topic, str) or not topic:
        raise ValueError("topic must be a non-empty string")
    raw = doc.get("timeout")
    if type(raw) not in (int, float):
        raise ValueError(f"timeout must be a number, got {raw!r}")
    timeout = float(raw)  # type: ignore[arg-type]
    if not 0 <= timeout < float("inf"):
        raise ValueError(f"timeout must be a finite number >= 0, got {raw!r}")
    pairs = doc.get("targets")
    if not isinstance(pairs, list):
        raise ValueError("targets must be a list of [partition, offset] pairs")
    targets: dict[int, int] = {}
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError(f"a target must be a [partition, offset] pair, got {pair!r}")
        targets[_int(pair[0], "partition")] = _int(pair[1], "offset")
    return Want(_int(doc.get("id"), "id"), topic, targets, timeout)


def decode_answer(line: bytes) -> Answer:
    """One answer line (without its newline). ``ValueError`` names what is wrong."""
    doc = _object(line, "an answer")
    wid = _int(doc.get("id"), "id")
    if "error" in doc:
        return Answer(wid, None, str(doc["error"]))
    stored = doc.get("stored")
    if not isinstance(stored, bool):
        raise ValueError(f"stored must be true or false, got {stored!r}")
    return Answer(wid, stored)


class LineBuffer:
    """Bytes in, complete lines out (newline stripped); the rest is kept for the next chunk."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._rest = b""

    def feed(self, data: bytes) -> list[bytes]:
        if b"\n" not in data:
            self._rest += data
            lines: list[bytes] = []
        else:
            lines = (self._rest + data).split(b"\n")
            self._rest = lines.pop()
        if len(self._rest) > self.max_line:
            raise ValueError(f"a message longer than {self.max_line} bytes")
        return lines


class _Writer:
    """Coalesces the lines written in one loop iteration into one ``transport.write``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport) -> None:
        self.loop = loop
        self.transport = transport
        self._out: list[bytes] = []

    def write(self, line: bytes) -> None:
        if not self._out:
            self.loop.call_soon(self._flush)
        self._out.append(line)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if not self.transport.is_closing():
            self.transport.write(b"".join(out))


# ---- the address ------------------------------------------------------------------------------


def new_address() -> tuple[str, str | None]:
    """A fresh address for a ``WaitServer`` and the directory to remove after it (if any)."""
    token = f"{os.getpid()}-{secrets.token_hex(8)}"
    if sys.platform.startswith("linux"):
        return f"@tally-run-wait-{token}", None
    directory = tempfile.mkdtemp(prefix="tally-run-")
    return os.path.join(directory, "wait.sock"), directory


def _os_address(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


# ---- the main process's side -------------------------------------------------------------------


class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: WaitServer) -> None:
        self.server = server
        self.lines = LineBuffer()
        self.tasks: set[asyncio.Task[None]] = set()
        self.transport: asyncio.Transport | None = None
        self.writer: _Writer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        self.writer = _Writer(asyncio.get_running_loop(), self.transport)
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            for line in self.lines.feed(data):
                want = decode_want(line)
                task = asyncio.get_running_loop().create_task(self._answer(want))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except ValueError as exc:
            log.warning("dropping the wait connection of the API process: %s", exc)
            assert self.transport is not None
            self.transport.abort()

    async def _answer(self, want: Want) -> None:
        assert self.writer is not None
        try:
            stored = await self.server.board.wait_for(want.topic, want.targets, want.timeout)
        except Exception as exc:
            log.exception("waiting for the worker failed")
            self.writer.write(encode_error(want.id, f"waiting for the worker failed: {exc}"))
        else:
            self.writer.write(encode_answer(want.id, stored))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for task in list(self.tasks):
            task.cancel()  # the board forgets the waiter (its ``finally``)


class WaitServer:
    """Serves ``board.wait_for`` on ``address`` from a thread of its own (``start``/``stop``)."""

    def __init__(self, board: Any, address: str | None = None) -> None:
        self.board = board
        self._dir: str | None = None
        if address is None:
            address, self._dir = new_address()
        self.address = address
        self.connections: set[_ServerConnection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> WaitServer:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    loop.create_unix_server(lambda: _ServerConnection(self), sock=self._listen())
                )
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name="tally-wait", daemon=True)
        self._thread.start()
        if not started.wait(timeout) or failure:
            reason = failure[0] if failure else "timed out"
            raise TallyError(f"cannot serve the wait socket {self.address}: {reason}")
        return self

    def _listen(self) -> socket.socket:
        # bound here, not by the event loop: uvloop refuses abstract names given as a path
        path = _os_address(self.address)
        if not path.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)  # left by a killed server
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def _shutdown(self) -> None:
        assert self._loop is not None
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self._loop.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the socket and every connection (their pending waits fail in the API child)."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(self._shutdown)
            thread.join(timeout)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# ---- the API child's side ---------------------------------------------------------------------


class _ClientConnection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, address: str) -> None:
        self.loop = loop
        self.address = address
        self.lines = LineBuffer()
        self.pending: dict[int, asyncio.Future[bool]] = {}
        self.next_id = 0
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self.writer: _Writer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        self.writer = _Writer(self.loop, self.transport)

    def data_received(self, data: bytes) -> None:
        try:
            for line in self.lines.feed(data):
                answer = decode_answer(line)
                fut = self.pending.pop(answer.id, None)
                if fut is None or fut.done():
                    continue  # a wait given up already (cancelled, or past its grace)
                if answer.error is not None:
                    fut.set_exception(Unavailable(f"the main process of tally run: {answer.error}"))
                else:
                    fut.set_result(bool(answer.stored))
        except ValueError as exc:
            log.warning("dropping the wait connection to the main process: %s", exc)
            assert self.transport is not None
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pending, self.pending = self.pending, {}
        reason = f": {exc}" if exc is not None else ""
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(
                    Unavailable(
                        "lost the connection to the main process of tally run while waiting "
                        f"for the worker{reason}; the events are accepted, retrying is safe"
                    )
                )

    async def wait_for(self, topic: str, targets: dict[int, int], timeout: float) -> bool:
        assert self.writer is not None
        self.next_id += 1
        wid = self.next_id
        fut: asyncio.Future[bool] = self.loop.create_future()
        self.pending[wid] = fut
        self.writer.write(encode_want(wid, topic, targets, timeout))
        expire = self.loop.call_later(timeout + ANSWER_GRACE_S, self._expire, wid)
        try:
            return await fut
        finally:
            expire.cancel()
            self.pending.pop(wid, None)

    def _expire(self, wid: int) -> None:
        fut = self.pending.pop(wid, None)
        if fut is not None and not fut.done():
            fut.set_exception(
                Unavailable("the main process of tally run did not answer a wait in time")
            )


class SocketProgressWaiter:
    """``wait_for`` on the main process's ``ProgressBoard`` through its ``WaitServer``."""

    def __init__(self, address: str) -> None:
        self.address = address
        # per event loop: (the loop, the task that connects it); a new one after a lost connection
        self._conns: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]] = {}

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _ClientConnection:
        # connected here, not by the event loop: uvloop (uvicorn's) refuses abstract names given
        # as a path. A UNIX-socket connect does not block: it succeeds, is refused, or (backlog
        # full) fails with EAGAIN at once.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(_os_address(self.address))
            _transport, conn = await asyncio.wait_for(
                loop.create_unix_connection(
                    lambda: _ClientConnection(loop, self.address), sock=sock
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise Unavailable(
                "cannot reach the main process of tally run to wait for the worker "
                f"({exc or type(exc).__name__}); the events are accepted, retrying is safe"
            ) from exc
        except BaseException:
            sock.close()
            raise
        return conn

    async def _connection(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        entry = self._conns.get(id(loop))
        if entry is not None and entry[0] is loop:
            task = entry[1]
            if not task.done():
                conn: _ClientConnection = await asyncio.shield(task)
                return conn
            if not task.cancelled() and task.exception() is None and not task.result().closed:
                return task.result()
        task = loop.create_task(self._connect(loop))
        self._conns[id(loop)] = (loop, task)
        conn = await asyncio.shield(task)
        return conn

    async def wait_for(self, topic: str, targets: dict[int, int], timeout: float) -> bool:
        conn = await self._connection()
        if conn.closed:  # lost between connecting and now: the next call reconnects
            raise Unavailable("lost the connection to the main process of tally run")
        return await conn.wait_for(topic, targets, timeout)
