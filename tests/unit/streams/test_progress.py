from __future__ import annotations

import asyncio
import threading
import time

import pytest

from streams.progress import ProgressBoard, StoreProgressWaiter
from tests.unit.streams.fakes import MemorySink


def test_wait_for_already_reached() -> None:
    b = ProgressBoard()
    b.notify("t", 0, 5)
    assert asyncio.run(b.wait_for("t", {0: 5}, 1.0))
    assert asyncio.run(b.wait_for("t", {0: 3}, 1.0))
    assert b.progress("t") == {0: 5}


def test_wait_times_out() -> None:
    b = ProgressBoard()
    b.notify("t", 0, 5)
    assert not asyncio.run(b.wait_for("t", {0: 6}, 0.05))
    assert not asyncio.run(b.wait_for("other", {0: 0}, 0.05))


def test_notify_never_goes_backwards() -> None:
    b = ProgressBoard()
    b.notify("t", 1, 10)
    b.notify("t", 1, 4)
    assert b.progress("t") == {1: 10}


def test_notify_from_another_thread_wakes_waiter_on_its_own_loop() -> None:
    b = ProgressBoard()
    results: list[bool] = []
    waiting = threading.Event()

    def api_thread() -> None:
        async def main() -> None:
            task = asyncio.create_task(b.wait_for("t", {0: 10, 1: 3}, 10.0))
            await asyncio.sleep(0.01)
            waiting.set()
            results.append(await task)

        asyncio.run(main())

    th = threading.Thread(target=api_thread)
    th.start()
    assert waiting.wait(5)
    b.notify("t", 0, 10)
    time.sleep(0.05)
    assert results == []  # partition 1 not there yet
    b.notify("t", 1, 2)
    b.notify("t", 1, 3)
    th.join(5)
    assert results == [True]


def test_many_waiters_many_threads() -> None:
    b = ProgressBoard()
    out: list[bool] = []

    async def main() -> None:
        waits = [b.wait_for("t", {p: 100}, 10.0) for p in range(4)]

        def notifier(p: int) -> None:
            for off in range(101):
                b.notify("t", p, off)

        threads = [threading.Thread(target=notifier, args=(p,)) for p in range(4)]
        gathered = asyncio.gather(*waits)
        await asyncio.sleep(0.01)
        for t in threads:
            t.start()
        out.extend(await gathered)
        for t in threads:
            t.join()

    asyncio.run(main())
    assert out == [True] * 4


def test_store_progress_waiter_polls() -> None:
    sink = MemorySink()
    w = StoreProgressWaiter(sink, poll_s=0.01)

    async def main() -> tuple[bool, bool]:
        fut = asyncio.create_task(w.wait_for("t", {2: 7}, 5.0))
        await asyncio.sleep(0.05)
        sink.commit("t", [], [], {2: 7})
        ok = await fut
        late = await w.wait_for("t", {2: 8}, 0.05)
        return ok, late

    assert asyncio.run(main()) == (True, False)


def test_a_new_waiter_wakes_and_ready_reports_it_once() -> None:
    b = ProgressBoard()
    b.notify("t", 0, 1)
    wakes: list[int] = []
    b.add_wake(lambda: wakes.append(1))

    async def main() -> bool:
        task = asyncio.create_task(b.wait_for("t", {0: 5, 1: 2}, 10.0))
        await asyncio.sleep(0.01)
        assert wakes == [1] and b.waiting == 1
        assert not b.ready("t", {0: 5})  # partition 1 not read yet
        assert not b.ready("other", {0: 5, 1: 2})
        assert b.ready("t", {0: 7, 1: 2})
        assert b.waiting == 0
        assert not b.ready("t", {0: 7, 1: 2})  # reported once
        b.notify("t", 0, 5)
        b.notify("t", 1, 2)
        return await task

    assert asyncio.run(main())
    assert b.waiting == 0


def test_no_wake_when_already_stored_and_waiting_count_after_timeout() -> None:
    b = ProgressBoard()
    b.notify("t", 0, 5)
    wakes: list[int] = []

    def wake() -> None:
        wakes.append(1)

    b.add_wake(wake)
    assert asyncio.run(b.wait_for("t", {0: 5}, 1.0))
    assert wakes == []
    assert not asyncio.run(b.wait_for("t", {0: 6}, 0.02))
    assert wakes == [1] and b.waiting == 0  # a waiter that gave up is not counted
    b.remove_wake(wake)
    b.remove_wake(wake)  # idempotent
    assert not asyncio.run(b.wait_for("t", {0: 6}, 0.02))
    assert wakes == [1]


def test_a_failing_wake_does_not_fail_the_wait() -> None:
    b = ProgressBoard()

    def broken() -> None:
        raise RuntimeError("event loop is closed")

    b.add_wake(broken)

    async def main() -> bool:
        task = asyncio.create_task(b.wait_for("t", {0: 0}, 10.0))
        await asyncio.sleep(0.01)
        b.notify("t", 0, 0)
        return await task

    assert asyncio.run(main())


class CountingSink(MemorySink):
    def __init__(self) -> None:
        super().__init__()
        self.polls = 0
        self.broken = False

    def progress(self, topic: str) -> dict[int, int]:
        self.polls += 1
        if self.broken:
            raise OSError("store down")
        return super().progress(topic)


def test_store_progress_waiter_shares_one_poll_between_waiters() -> None:
    sink = CountingSink()
    w = StoreProgressWaiter(sink, poll_s=0.02)

    async def main() -> list[bool]:
        tasks = [asyncio.create_task(w.wait_for("t", {p % 4: 3}, 10.0)) for p in range(40)]
        await asyncio.sleep(0.2)  # ~10 polls, whatever the number of waiters
        assert sink.polls < 40
        sink.commit("t", [], [], {0: 3, 1: 3, 2: 3, 3: 3})
        out = list(await asyncio.gather(*tasks))
        assert w._polls == {}  # the poll stops when nobody waits
        return out

    assert asyncio.run(main()) == [True] * 40
    assert asyncio.run(w.wait_for("t", {0: 3}, 1.0))  # a new loop, a new poll


def test_store_progress_waiter_store_error_fails_the_waiters() -> None:
    sink = CountingSink()
    sink.broken = True
    w = StoreProgressWaiter(sink, poll_s=0.01)

    async def main() -> None:
        with pytest.raises(OSError, match="store down"):
            await w.wait_for("t", {0: 1}, 5.0)
        sink.broken = False
        sink.commit("t", [], [], {0: 1})
        assert await w.wait_for("t", {0: 1}, 5.0)

    asyncio.run(main())
