"""Waiting for the worker's progress (ingest ``wait=stored``).

``ProgressBoard``: in-process (embedded mode). The worker thread calls ``notify`` after each
commit; the API's asyncio loop (another thread) awaits ``wait_for``.
``StoreProgressWaiter``: scale-out mode, polls the store's progress rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.sink import Sink


def _reached(current: dict[int, int], targets: dict[int, int]) -> bool:
    return all(current.get(p, -1) >= off for p, off in targets.items())


@dataclass(eq=False)
class _Waiter:
    topic: str
    targets: dict[int, int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[bool]


def _resolve(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(True)


class ProgressBoard:
    """Last stored offset per (topic, partition). ``notify`` from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offsets: dict[str, dict[int, int]] = {}
        self._waiters: set[_Waiter] = set()

    def notify(self, topic: str, partition: int, offset: int) -> None:
        with self._lock:
            offs = self._offsets.setdefault(topic, {})
            if offs.get(partition, -1) >= offset:
                return
            offs[partition] = offset
            done = [w for w in self._waiters if w.topic == topic and _reached(offs, w.targets)]
            for w in done:
                self._waiters.discard(w)
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
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            with self._lock:
                self._waiters.discard(waiter)


class StoreProgressWaiter:
    """``wait_for`` by polling the store's progress (scale-out: the worker is elsewhere)."""

    def __init__(self, sink: Sink, poll_s: float = 0.05) -> None:
        self.sink = sink
        self.poll_s = poll_s

    async def wait_for(self, topic: str, targets: dict[int, int], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            current = await asyncio.to_thread(self.sink.progress, topic)
            if _reached(current, targets):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(self.poll_s, remaining))
