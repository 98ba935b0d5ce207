"""A crash in native code leaves a trace: the entry points' logging setup enables faulthandler,
so a segfault prints every thread's Python stack to stderr (a worker that died with -11 in CI
left nothing to read)."""

from __future__ import annotations

import signal
import subprocess
import sys

CRASH = (
    "import ctypes, threading\n"
    "from tally.log import configure\n"
    "configure()\n"
    "threading.Thread(target=lambda: threading.Event().wait(), daemon=True, name='idle').start()\n"
    "def flush_thread_work():\n"
    "    ctypes.string_at(0)\n"
    "flush_thread_work()\n"
)


def test_a_segfault_prints_every_threads_stack() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CRASH], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in out.stderr
    assert "in flush_thread_work" in out.stderr  # the crashing thread's stack
    assert "Current thread 0x" in out.stderr and "\nThread 0x" in out.stderr  # and the others
