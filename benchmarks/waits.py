"""What each thread of a process does with its wall time: running, waiting for Python's
interpreter lock, in a store (chDB) call, or idle; from ``py-spy record --native --idle
--threads -f raw`` (docs/performance.md, "The flush thread's waits at the plateau").

    python -m benchmarks.waits PID [SECONDS]     # record PID for SECONDS (default 10), then print
                                                 # (the raw profile stays in <tmp>/waits-PID.raw)
    python -m benchmarks.waits --file RAW        # print the summary of a recorded raw profile

With ``--idle`` py-spy keeps the samples of threads that are not running and with ``--native``
it shows the C frames under the Python ones, so that a sample tells where the thread is blocked.
The classes, tried in this order on the stack of each sample:

- ``lock wait``: blocked in ``take_gil`` / ``PyEval_RestoreThread`` where py-spy names them,
  or in ``pthread_cond_timedwait`` outside a chDB call: CPython 3.11 waits for the interpreter
  lock there (its other waits, locks and ``Event.wait``, use semaphores);
- ``store waits``: inside a chDB call (a frame of ``chdb/``), blocked on a condition variable:
  the statement runs on the store's own threads meanwhile;
- ``store runs``: inside a chDB call otherwise (the statement on this thread);
- ``idle``: waiting for work: a ``SimpleQueue.get`` (a pool thread between jobs), a blocking
  socket or poll call (``recv``, ``epoll_wait``, ...), or a Python leaf that only waits
  (``benchmarks.profile.IDLE_LEAVES``: selectors, ``Event.wait``, ...);
- ``running``: everything else (Python, or C called from it, on a core or waiting for one).

Sampling with ``--native`` slows the process while it runs (a run measured with it is not a
throughput figure): the classes are shares of the sampled time, for comparing runs.
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import typer

from benchmarks.profile import Recorder, is_idle, parse_frame, thread_name
from benchmarks.target import BenchError

CLASSES = ("running", "lock wait", "store runs", "store waits", "idle")


@dataclass
class ThreadWaits:
    """One thread's samples by class (``CLASSES``)."""

    name: str
    samples: Counter[str]

    @property
    def total(self) -> int:
        return sum(self.samples.values())

    def share(self, cls: str) -> float:
        return self.samples[cls] / self.total if self.total else 0.0


# C functions in which a thread blocks until a socket, a timer or a poll has something for it.
_BLOCKING = frozenset(
    "recv recvfrom accept accept4 epoll_wait epoll_pwait poll ppoll select pselect nanosleep "
    "clock_nanosleep".split()
)


def _c_function(frame: str) -> str:
    return frame.split(" (", 1)[0]


def classify(frames: list[str]) -> str:
    """The class of one sample's stack (outermost frame first, thread label removed)."""
    tail = frames[-3:]
    in_tail = " ".join(tail)
    lock = any(x in f for f in frames[-4:] for x in ("take_gil", "PyEval_RestoreThread"))
    if any("chdb/" in f for f in frames):
        if lock:
            return "lock wait"
        return "store waits" if "pthread_cond_" in in_tail else "store runs"
    if lock or any("pthread_cond_timedwait" in f for f in frames[-2:]):
        return "lock wait"
    if any("_queue_SimpleQueue_get" in f for f in frames):
        return "idle"
    if frames and _c_function(frames[-1]) in _BLOCKING:
        return "idle"
    python_leaf = next((f for f in reversed(frames) if ".py:" in f), None)
    if python_leaf is not None and is_idle(parse_frame(python_leaf)):
        return "idle"
    return "running"


def summarise(raw: str) -> list[ThreadWaits]:
    """Per thread, its samples by class; threads in order of their samples, then name."""
    by_thread: dict[str, Counter[str]] = {}
    for line in raw.splitlines():
        stack, _, count_s = line.strip().rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        parts = stack.split(";")
        label = parts.pop(0) if parts and parts[0].startswith("thread (") else "?"
        name = thread_name(label)
        by_thread.setdefault(name, Counter())[classify(parts)] += int(count_s)
    out = [ThreadWaits(n, c) for n, c in by_thread.items()]
    return sorted(out, key=lambda t: (-t.total, t.name))


def render(threads: list[ThreadWaits]) -> str:
    head = f"{'thread':32s}" + "".join(f"{c:>13s}" for c in CLASSES) + f"{'samples':>10s}"
    rows = [head]
    for t in threads:
        shares = "".join(f"{100 * t.share(c):12.1f}%" for c in CLASSES)
        rows.append(f"{t.name[:32]:32s}{shares}{t.total:10d}")
    return "\n".join(rows)


def record(pid: int, seconds: int, out: Path, rate: int = 100) -> str:
    """``py-spy record --native --idle --threads`` of ``pid`` for ``seconds``: the raw text."""
    rec = Recorder(pid, seconds, out, rate, flags=("--native", "--idle", "--threads"))
    try:
        rec.wait(seconds + 60)
    except BenchError as exc:  # its message holds the end of py-spy's log
        raise typer.BadParameter(f"py-spy failed: {str(exc)[-300:]}", param_hint="PID") from None
    finally:
        rec.log.unlink(missing_ok=True)
    return out.read_text(errors="replace")


app = typer.Typer(add_completion=False)


@app.command()
def main(
    pid: int = typer.Argument(0, min=0, help="process to sample (0 with --file)"),
    seconds: int = typer.Argument(10, min=1, max=600, help="how long to sample"),
    file: Path | None = typer.Option(None, "--file", help="summarise this raw profile instead"),
) -> None:
    if file is not None:
        if not file.is_file():
            raise typer.BadParameter(f"no such file: {file}", param_hint="--file")
        raw = file.read_text(errors="replace")
    elif pid > 0:
        raw = record(pid, seconds, Path(tempfile.gettempdir()) / f"waits-{pid}.raw")
    else:
        raise typer.BadParameter("give a PID to sample or --file RAW", param_hint="PID")
    threads = summarise(raw)
    if not threads:
        hint = "--file" if file is not None else "PID"
        raise typer.BadParameter("the profile holds no samples", param_hint=hint)
    typer.echo(render(threads))


if __name__ == "__main__":
    app(args=sys.argv[1:])
