"""Python's cyclic garbage collector in Tally's long-running processes.

Decoding a JSON batch builds thousands of small containers at once. With Python's default
thresholds (a young-generation collection every 700 net allocations), each burst starts
collections that walk the still-live batch, promote it, and every so often walk every live
object of the process (full collections), although none of it is garbage: reference counting
frees the batch once it is processed. Pausing the collector around the decode alone does not
help: the allocation count stays high, so the first allocation after the pause collects the
batch, which is still alive (measured: the API's JSON decode spent ~8 % of its samples there).

``tune_gc`` is called once by each entry point (`tally run`, its API child, `tally api`,
`tally worker`; setting ``gc_threshold``): it freezes what start-up built (modules, the app) out
of the collector's reach and raises the young-generation threshold, so a collection runs every
``gc_threshold`` net allocations, by which time the batches that caused them are freed. Cyclic
garbage is still collected; it just waits a little longer (at most that many objects).

``gc_paused`` pauses the collector around a block whose objects all live until its end (an
invoice run's rating), counted and thread-safe.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

_lock = threading.Lock()
_depth = 0
_was_enabled = False


def tune_gc(threshold: int) -> None:
    """Freeze start-up objects and collect the young generation every ``threshold`` net
    allocations (0 keeps Python's defaults). Older generations keep their default ratios."""
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(threshold, older, oldest)
    log.debug(
        "gc: %d start-up objects frozen, thresholds %s", gc.get_freeze_count(), gc.get_threshold()
    )


@contextmanager
def gc_paused() -> Iterator[None]:
    """Run the block with the cyclic garbage collector paused."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
