"""Interpreter settings of Tally's long-running processes, applied once by each entry point
(`tally run`, its API child, `tally api`, `tally worker`): the cyclic collector's thresholds
(``tally.gcpause.tune_gc``, setting ``gc_threshold``) and the thread switch interval (setting
``switch_interval_ms``).

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
import sys

from tally.gcpause import tune_gc
from tally.settings import Settings

log = logging.getLogger(__name__)


def tune_process(settings: Settings) -> None:
    """Apply ``gc_threshold`` and ``switch_interval_ms`` to this process."""
    tune_gc(settings.gc_threshold)
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    log.debug("thread switch interval %.4f s", sys.getswitchinterval())
