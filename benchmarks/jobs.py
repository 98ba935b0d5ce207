"""Run a function in a fresh child process, with progress reported back to the parent.

chDB allows one process per data directory and one directory per process, so every job that
opens a store (ceilings, history, direct queries) runs in its own short-lived process and the
harness process itself never opens chDB.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from benchmarks.target import BenchError

Progress = Callable[[int, int, str], None]  # (done, total, description)


class _Reporter:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __call__(self, done: int, total: int, what: str = "") -> None:
        self.conn.send(("progress", done, total, what))


def _main(fn: Callable[..., Any], args: tuple[Any, ...], conn: Connection) -> None:
    try:
        result = fn(*args, progress=_Reporter(conn))
        conn.send(("result", result))
    except BaseException as exc:  # report everything to the parent, then exit
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_job(
    fn: Callable[..., Any],
    *args: Any,
    progress: Progress | None = None,
    timeout: float = 3600,
) -> Any:
    """``fn(*args, progress=...)`` in a spawned process; its return value (must pickle)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_main, args=(fn, args, child), daemon=True)
    proc.start()
    child.close()
    done = False
    try:
        while True:
            if not parent.poll(timeout):
                raise BenchError(f"job {fn.__name__} sent nothing for {timeout:.0f}s")
            try:
                msg = parent.recv()
            except EOFError:
                raise BenchError(
                    f"job {fn.__name__} died without an answer (exit code {proc.exitcode})"
                ) from None
            if msg[0] == "progress":
                if progress is not None:
                    progress(msg[1], msg[2], msg[3])
            elif msg[0] == "result":
                done = True
                return msg[1]
            else:
                raise BenchError(f"job {fn.__name__} failed: {msg[1]}")
    finally:
        proc.join(60 if done else 1)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
