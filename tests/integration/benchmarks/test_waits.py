"""``python -m benchmarks.waits`` samples a real process with py-spy and classes each thread's
samples; its refusals name the argument."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.waits import app
from tests.support.modules import run_module

# A thread that runs Python without pause, beside a main thread that sleeps.
SPINNER = """
import threading, time
def spin():
    n = 0
    while True:
        n += 1
threading.Thread(target=spin, name="spinner", daemon=True).start()
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def spinner() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", SPINNER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(10)


def _row(out: str, thread: str) -> list[float]:
    line = next(ln for ln in out.splitlines() if ln.startswith(thread))
    return [float(x) for x in re.findall(r"([\d.]+)%", line)]


def test_a_running_thread_and_a_sleeping_one(spinner: int) -> None:
    out = run_module("benchmarks.waits", str(spinner), "2", timeout=120)
    head = out.splitlines()[0].split()
    assert head[:3] == ["thread", "running", "lock"]
    running, lock, store_runs, store_waits, idle = _row(out, "spinner")
    assert running >= 90.0 and lock <= 10.0 and idle == store_runs == store_waits == 0.0
    assert _row(out, "MainThread")[4] >= 90.0  # in time.sleep: idle


def test_a_recorded_profile_is_read_from_a_file(tmp_path: Path) -> None:
    flush = "thread (11): tally-flush_0;BatchProcessor.prepare (/repo/streams/processor.py:479)"
    raw = tmp_path / "p.raw"
    raw.write_text(
        f"{flush};_keep (/repo/streams/processor.py:144) 3\n"
        f"{flush};pthread_cond_timedwait (libc.so.6) 1\n"
        "thread (12): tally-worker;sock_call_ex (socketmodule.c:921);recv (libc.so.6) 2\n"
    )
    out = run_module("benchmarks.waits", "--file", str(raw))
    assert _row(out, "tally-flush_0") == [75.0, 25.0, 0.0, 0.0, 0.0]
    assert _row(out, "tally-worker") == [0.0, 0.0, 0.0, 0.0, 100.0]


def test_what_it_cannot_use_is_refused_naming_the_argument(tmp_path: Path) -> None:
    runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})
    empty = tmp_path / "empty.raw"
    empty.write_text("nothing here\n")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(30)  # a process id that no process holds now
    for args, named in (
        ([], "Invalid value for PID: give a PID"),
        (["--file", str(tmp_path / "missing.raw")], "Invalid value for --file: no such file"),
        (["--file", str(empty)], "Invalid value for --file: the profile holds no samples"),
        (["12", "0"], "Invalid value for 'seconds'"),
        (["abc"], "Invalid value for 'pid'"),
        ([str(gone.pid), "1"], "Invalid value for PID: py-spy failed"),
    ):
        done = runner.invoke(app, args)
        assert done.exit_code == 2, (args, done.output)
        assert named in done.output, (args, done.output)
