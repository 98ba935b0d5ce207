"""The wait hop of `tally run` split mode (runtime.waithop) with real parts: a ``WaitServer`` on a
real UNIX socket over a real ``ProgressBoard`` (notified from another thread, as the worker
does), and ``SocketProgressWaiter`` as the API child uses it. Each test serves a fresh address.

Deadlines are generous and only catch a hang: nothing here measures a duration.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from runtime.waithop import SocketProgressWaiter, WaitServer, new_address
from streams.progress import ProgressBoard
from tally.errors import Unavailable

LONG = 600.0  # a wait's own timeout when the test must end it some other way
HANG = 60.0  # a wait still pending after this is a hang: the test fails
T = TypeVar("T")


Run = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run[Any]:
    """Runs a coroutine on a new loop: asyncio's, or uvloop (what uvicorn runs the API child on)."""
    import uvloop

    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop

    def go(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)

    return go


@pytest.fixture
def board() -> ProgressBoard:
    return ProgressBoard()


@pytest.fixture
def server(board: ProgressBoard) -> Iterator[WaitServer]:
    srv = WaitServer(board).start()
    try:
        yield srv
    finally:
        srv.stop()


def _notify_later(board: ProgressBoard, *updates: tuple[str, int, int]) -> threading.Thread:
    """Notify from another thread, as the worker does after a commit."""
    t = threading.Thread(target=lambda: [board.notify(*u) for u in updates])
    t.start()
    return t


async def _until(cond: object, what: str) -> None:
    for _ in range(int(HANG / 0.01)):
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_concurrent_waits_on_one_connection_resolve_independently(
    run: Run[Any], board: ProgressBoard, server: WaitServer
) -> None:
    waiter = SocketProgressWaiter(server.address)

    async def main() -> None:
        a = asyncio.create_task(waiter.wait_for("t", {0: 10}, LONG))
        b = asyncio.create_task(waiter.wait_for("t", {0: 10, 1: 5}, LONG))
        c = asyncio.create_task(waiter.wait_for("u", {0: 1}, LONG))
        # every want has reached the board (a waiter each) before anything is stored
        await _until(lambda: len(board._waiters) == 3, "three waiters on the board")
        assert len(server.connections) == 1  # multiplexed on one connection
        _notify_later(board, ("t", 0, 10)).join()
        assert await asyncio.wait_for(a, HANG) is True
        assert not b.done() and not c.done()  # b still needs partition 1, c another topic
        _notify_later(board, ("t", 1, 7)).join()
        assert await asyncio.wait_for(b, HANG) is True
        assert not c.done()
        _notify_later(board, ("u", 0, 1)).join()
        assert await asyncio.wait_for(c, HANG) is True
        # already stored: answered at once, on the same connection
        assert await asyncio.wait_for(waiter.wait_for("t", {0: 3, 1: 7}, LONG), HANG) is True
        assert len(server.connections) == 1
        assert not board._waiters  # nothing left behind on the board

    run(main())


def test_many_concurrent_waits_each_get_their_own_answer(
    run: Run[Any], board: ProgressBoard, server: WaitServer
) -> None:
    waiter = SocketProgressWaiter(server.address)

    async def main() -> None:
        # odd offsets get stored, even ones time out: each answer must reach its own request
        tasks = [
            asyncio.create_task(waiter.wait_for("t", {i % 4: i}, LONG if i % 2 else 0.5))
            for i in range(1, 201)
        ]
        await _until(lambda: sum(t.done() for t in tasks) == 100, "the 100 timeouts")
        for p in range(4):
            for i in range(1, 201):
                if i % 4 == p and i % 2:
                    board.notify("t", p, i)
                    await asyncio.sleep(0)
        got = await asyncio.wait_for(asyncio.gather(*tasks), HANG)
        assert got == [bool(i % 2) for i in range(1, 201)]
        assert len(server.connections) == 1

    run(main())


def test_a_wait_answers_false_at_its_timeout(
    run: Run[Any], board: ProgressBoard, server: WaitServer
) -> None:
    waiter = SocketProgressWaiter(server.address)
    board.notify("t", 0, 4)

    async def main() -> None:
        assert await asyncio.wait_for(waiter.wait_for("t", {0: 5}, 0.2), HANG) is False
        assert await asyncio.wait_for(waiter.wait_for("t", {0: 4}, 0.2), HANG) is True

    run(main())
    assert not board._waiters


def test_a_remote_wait_wakes_the_worker(
    run: Run[Any], board: ProgressBoard, server: WaitServer
) -> None:
    woken = threading.Event()
    board.add_wake(woken.set)  # what the worker registers: flush now, someone waits
    waiter = SocketProgressWaiter(server.address)

    async def main() -> None:
        task = asyncio.create_task(waiter.wait_for("t", {2: 9}, LONG))
        await _until(woken.is_set, "the worker woken by the remote wait")
        assert board.ready("t", {2: 9})  # the worker sees what it must flush for
        board.notify("t", 2, 9)
        assert await asyncio.wait_for(task, HANG) is True

    run(main())


def test_stopping_the_server_fails_pending_waits_and_a_new_server_is_reached(
    run: Run[Any],
    board: ProgressBoard,
) -> None:
    first = WaitServer(board).start()
    waiter = SocketProgressWaiter(first.address)

    async def main() -> None:
        pending = [asyncio.create_task(waiter.wait_for("t", {0: i}, LONG)) for i in range(5)]
        await _until(lambda: len(board._waiters) == 5, "five waiters on the board")
        await asyncio.to_thread(first.stop)
        for task in pending:
            with pytest.raises(Unavailable, match="lost the connection"):
                await asyncio.wait_for(task, HANG)
        await _until(lambda: not board._waiters, "the board forgets the dropped waiters")
        # nobody serves the address now: refused at once, never a hang
        with pytest.raises(Unavailable, match="cannot reach the main process"):
            await asyncio.wait_for(waiter.wait_for("t", {0: 0}, LONG), HANG)
        second = WaitServer(board, first.address).start()
        try:
            board.notify("t", 0, 1)
            assert await asyncio.wait_for(waiter.wait_for("t", {0: 1}, LONG), HANG) is True
            assert len(second.connections) == 1
        finally:
            await asyncio.to_thread(second.stop)

    run(main())


SERVE = """
import sys, time
from runtime.waithop import WaitServer
from streams.progress import ProgressBoard
board = ProgressBoard()
board.notify("t", 0, 100)
WaitServer(board, sys.argv[1]).start()
print("serving", flush=True)
time.sleep(3600)
"""


def _serve_in_process(address: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, address],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "serving", f"the server process did not start (exit {proc.poll()})"
    return proc


def test_kill9_of_the_main_process_fails_pending_waits_then_a_new_one_is_reached(
    run: Run[Any],
) -> None:
    address, _dir = new_address()
    waiter = SocketProgressWaiter(address)
    proc = _serve_in_process(address)
    again: subprocess.Popen[str] | None = None
    try:

        async def main() -> None:
            nonlocal again
            assert await asyncio.wait_for(waiter.wait_for("t", {0: 100}, LONG), HANG) is True
            pending = [asyncio.create_task(waiter.wait_for("t", {1: i}, LONG)) for i in range(8)]
            await asyncio.sleep(0.2)  # the wants are on their way or in the server: either way
            os.kill(proc.pid, signal.SIGKILL)
            for task in pending:
                with pytest.raises(Unavailable):
                    await asyncio.wait_for(task, HANG)
            await asyncio.to_thread(proc.wait, HANG)
            again = await asyncio.to_thread(_serve_in_process, address)
            assert await asyncio.wait_for(waiter.wait_for("t", {0: 50}, LONG), HANG) is True

        run(main())
    finally:
        for p in (proc, again):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_one_connection_per_event_loop(
    run: Run[Any], board: ProgressBoard, server: WaitServer
) -> None:
    """uvicorn's loop in a restarted API child, or two loops in one process: each its own."""
    waiter = SocketProgressWaiter(server.address)
    board.notify("t", 0, 1)

    async def once() -> bool:
        return await asyncio.wait_for(waiter.wait_for("t", {0: 1}, LONG), HANG)

    assert run(once()) is True
    assert run(once()) is True  # a new loop: the old loop's connection is not reused
    results: list[bool] = []
    t = threading.Thread(target=lambda: results.append(run(once())))
    t.start()
    t.join(HANG)
    assert results == [True]


def test_a_broken_peer_is_dropped_and_others_are_still_served(
    run: Run[Any], board: ProgressBoard, server: WaitServer
) -> None:
    waiter = SocketProgressWaiter(server.address)
    address = "\0" + server.address[1:] if server.address.startswith("@") else server.address

    async def main() -> None:
        good = asyncio.create_task(waiter.wait_for("t", {0: 1}, LONG))
        await _until(lambda: len(board._waiters) == 1, "the good waiter on the board")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
            bad.connect(address)
            bad.sendall(b'{"id":1,"topic":"t","targets":[[0,1]],"timeout":600}\nnot json\n')
            bad.settimeout(HANG)
            assert bad.recv(100) == b""  # dropped: closed without an answer
        await _until(lambda: len(board._waiters) == 1, "the bad peer's waiter dropped")
        board.notify("t", 0, 1)
        assert await asyncio.wait_for(good, HANG) is True

    run(main())


def test_a_filesystem_socket_path_works_too(
    run: Run[Any], board: ProgressBoard, tmp_path: Path
) -> None:
    base = tmp_path
    if len(str(tmp_path)) > 90:  # the AF_UNIX path limit (108): a short private directory
        base = Path(tempfile.mkdtemp(prefix="tw-"))
    path = str(base / "w.sock")
    srv = WaitServer(board, path).start()
    try:
        board.notify("t", 0, 1)

        async def main() -> bool:
            return await asyncio.wait_for(
                SocketProgressWaiter(path).wait_for("t", {0: 1}, LONG), HANG
            )

        assert run(main()) is True
    finally:
        srv.stop()
        if base != tmp_path:
            shutil.rmtree(base, ignore_errors=True)
