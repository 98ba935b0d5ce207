"""Waiting for the worker's progress (ingest ``wait=stored``).

``ProgressBoard``: in-process (embedded mode). The worker thread calls ``notify`` after each
commit; the API's asyncio loop (another thread) awaits ``wait_for``. A waiting request also wakes
the worker (``add_wake``): once the worker has read every message a waiter waits for
(``ready``), it flushes at once instead of at the end of its flush interval, so that a client
sending one batch at a time is answered in about one store commit, not in up to
``flush_interval_s`` plus one commit.
``StoreProgressWaiter``: scale-out mode (the worker is another process): one poll of the store's
progress rows per topic and interval, shared by every waiting request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.sink import Sink

log = logging.getLogger(__name__)


def _reached(current: dict[int, int], targets: dict[int, int]) -> bool:
    return all(current.get(p, -1) >= off for p, off in targets.items())


@dataclass(eq=False)
class _Waiter:
    topic: str
    targets: dict[int, int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[bool]
    woke: bool = field(default=False)  # ``ready`` reported it once already


def _resolve(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(True)


class ProgressBoard:
    """Last stored offset per (topic, partition). ``notify`` from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offsets: dict[str, dict[int, int]] = {}
        self._waiters: set[_Waiter] = set()
        self._wakes: list[Callable[[], None]] = []
        self.waiting = 0  # waiters not reported by ``ready`` yet (read without the lock)

    def add_wake(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` (from the waiting request's thread) whenever a request starts waiting."""
        with self._lock:
            self._wakes.append(fn)

    def remove_wake(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if fn in self._wakes:
                self._wakes.remove(fn)

    def ready(self, topic: str, read: dict[int, int]) -> bool:
        """True if a waiter of ``topic`` waits only for offsets at or below ``read`` (what the
        worker has read), i.e. the next flush would answer it. Each waiter is reported once."""
        if not self.waiting:
            return False
        found = False
        with self._lock:
            for w in self._waiters:
                if not w.woke and w.topic == topic and _reached(read, w.targets):
                    w.woke = True
                    self.waiting -= 1
                    found = True
        return found

    def notify(self, topic: str, partition: int, offset: int) -> None:
        with self._lock:
            offs = self._offsets.setdefault(topic, {})
            if offs.get(partition, -1) >= offset:
                return
            offs[partition] = offset
            done = [w for w in self._waiters if w.topic == topic and _reached(offs, w.targets)]
            for w in done:
                self._discard(w)
        for w in done:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
                w.loop.call_soon_threadsafe(_resolve, w.future)

    def progress(self, topic: str) -> dict[int, int]:
        with self._lock:
            return dict(self._offsets.get(topic, {}))

    async def wait_for(self, topic: str, targets: dict[int, int], timeout: float) -> bool:
        """True once every ``targets[p]`` offset is stored, False after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        waiter = _Waiter(topic, dict(targets), loop, fut)
        with self._lock:
            if _reached(self._offsets.get(topic, {}), targets):
                return True
            self._waiters.add(waiter)
            self.waiting += 1
            wakes = list(self._wakes)
        for wake in wakes:
            try:
                wake()
            except Exception:  # a stopped worker: the flush interval answers (or the timeout)
                log.debug("waking the worker failed", exc_info=True)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            with self._lock:
                self._discard(waiter)

    def _discard(self, waiter: _Waiter) -> None:
        """Under the lock."""
        if waiter in self._waiters:
            self._waiters.discard(waiter)
            if not waiter.woke:
                self.waiting -= 1


@dataclass(eq=False)
class _Poll:
    """The shared poll of one topic on one event loop, and the requests waiting on it."""

    topic: str
    waiters: list[tuple[dict[int, int], asyncio.Future[bool]]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class StoreProgressWaiter:
    """``wait_for`` by polling the store's progress (scale-out: the worker is elsewhere).

    One poll of a topic's progress rows every ``poll_s`` serves every request of this process
    waiting on that topic (not one poll per waiting request); it stops when nobody waits. A
    store error fails the requests waiting at that moment (the caller answers it as before).
    """

    def __init__(self, sink: Sink, poll_s: float = 0.05) -> None:
        self.sink = sink
        self.poll_s = poll_s
        self._polls: dict[tuple[int, str], _Poll] = {}

    async def wait_for(self, topic: str, targets: dict[int, int], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        key = (id(loop), topic)
        poll = self._polls.get(key)
        if poll is None or poll.task is None or poll.task.done():
            poll = self._polls[key] = _Poll(topic)
            poll.task = loop.create_task(self._run(poll, key))
        fut: asyncio.Future[bool] = loop.create_future()
        entry = (dict(targets), fut)
        poll.waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                poll.waiters.remove(entry)

    async def _run(self, poll: _Poll, key: tuple[int, str]) -> None:
        try:
            while True:
                try:
                    current = await asyncio.to_thread(self.sink.progress, poll.topic)
                except Exception as exc:
                    for _targets, fut in poll.waiters:
                        if not fut.done():
                            fut.set_exception(exc)
                else:
                    for targets, fut in poll.waiters:
                        if not fut.done() and _reached(current, targets):
                            fut.set_result(True)
                poll.waiters[:] = [w for w in poll.waiters if not w[1].done()]
                if not poll.waiters:
                    return  # no await between this check and the task's end: no waiter lost
                await asyncio.sleep(self.poll_s)
        finally:
            if self._polls.get(key) is poll:
                del self._polls[key]
