"""Pausing Python's cyclic garbage collector around bulk decoding (counted, thread-safe).

Decoding a JSON batch builds thousands of small containers at once; each allocation burst makes
the collector walk them (and, every so often, every live object of the process) although none of
them is garbage yet. Reference counting still frees everything while the collector is paused.
Nested and concurrent pauses are counted: the collector is back on when the last one ends, if it
was on when the first one began.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


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
