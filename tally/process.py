"""Interpreter settings of Tally's long-running processes, applied once by each entry point
(`tally run`, its API child, `tally api`, `tally worker`): the cyclic collector's thresholds
(``tally.gcpause.tune_gc``, setting ``gc_threshold``) and the thread switch interval (setting
``switch_interval_ms``); and ``thread_nice``, the CPU priority of one thread (the worker's flush
thread: setting ``flush_thread_nice``).

The switch interval is how long a thread that wants Python's interpreter lock waits for the
thread holding it before asking it to let go. A call into chDB, sqlite or a socket lets go of the
lock while native code runs and takes it back several times on the way (converting arguments
and results); each time, with Python's default of 5 ms, it can wait up to 5 ms behind a thread
that is busy in Python (the worker's consumer loop, the store server's threads). Measured
(``python -m benchmarks.switch_interval``): 60 chDB calls (an insert and a progress read, 30
times) took 3-6x as long beside one busy Python thread at 5 ms, 1.7-1.9x at 1 ms; `tally run` at
half load answered sooner at 1 ms (docs/performance.md, "The flush cycle at half load").
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from tally.gcpause import tune_gc
from tally.settings import Settings

log = logging.getLogger(__name__)


def tune_process(settings: Settings) -> None:
    """Apply ``gc_threshold`` and ``switch_interval_ms`` to this process."""
    tune_gc(settings.gc_threshold)
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    log.debug("thread switch interval %.4f s", sys.getswitchinterval())


def thread_nice(nice: int) -> bool:
    """Give the calling thread the scheduler's nice value ``nice`` (-20 highest priority .. 19
    lowest; 0 leaves it as it is). True when it was set.

    Linux keeps a nice value per thread, and a thread starts with its creator's, so the threads
    this one starts later share it. Raising a thread's priority (a negative value) needs
    CAP_SYS_NICE (root, or ``--cap-add SYS_NICE`` in a container); without it the thread keeps
    its priority and this logs once why. Other systems keep one priority per process: nothing is
    changed there. Never raises (a thread pool's initializer that raised would break the pool).

    Why the worker's flush thread: it is the one serial step of the stored rate (prepare, the
    store's calls, the index), and on a machine whose cores are shared with the API, the broker
    and the store's merges it waited for a core ~30 % of its time at the plateau (docs/
    performance.md, "The flush thread's CPU priority").
    """
    if nice == 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as exc:
        global _nice_refused
        if not _nice_refused:
            _nice_refused = True
            log.info(
                "thread %s keeps its CPU priority: nice %d was refused (%s); a negative value "
                "needs CAP_SYS_NICE, e.g. root or `--cap-add SYS_NICE` (setting "
                "flush_thread_nice, 0 = leave it)",
                threading.current_thread().name,
                nice,
                exc.strerror or type(exc).__name__,
            )
        return False
    log.debug("thread %s runs at nice %d", threading.current_thread().name, nice)
    return True


_nice_refused = False
