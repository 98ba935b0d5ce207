"""The rating worker pool of an invoice run.

Rating is pure Python (CPU-bound), so threads would share one core through the GIL: large runs
are composed in worker PROCESSES (``spawn``: a fresh interpreter that imports only billing,
rating and schemas, never the store). Small runs (or ``workers=1``) are composed inline, since
starting a process costs more than rating a few hundred invoices.

Python's cyclic garbage collector: an invoice run builds hundreds of thousands of objects that
all live until the run ends (subscriptions, usage, invoices), and every full collection walks
all of them again; at 10k customers that was more than half of the run's time. A run therefore
pauses the collector (``tally.gcpause.gc_paused``; reference counting still frees everything that is not a
cycle) and the worker processes run without it.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

from billing.compose import ComposeInput, ComposeResult, compose_many

log = logging.getLogger(__name__)

INLINE_MAX = 400  # invoices: below this, no processes
CHUNK = 250  # subscriptions per task


def _worker_init() -> None:
    gc.disable()  # a worker lives for one run's rating: nothing to collect but garbage


def pool_size(workers: int) -> int:
    return workers if workers > 0 else max(1, os.cpu_count() or 1)


def compose_groups(
    groups: Sequence[Sequence[ComposeInput]],
    workers: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[list[ComposeResult]]:
    """``compose_many`` over ``groups`` (one per subscription), in order."""
    n = pool_size(workers)
    total = sum(len(g) for g in groups)
    if n <= 1 or total <= INLINE_MAX:
        out = []
        done = 0
        for i in range(0, len(groups), CHUNK):
            part = compose_many(groups[i : i + CHUNK])
            out.extend(part)
            done += sum(len(g) for g in part)
            if progress:
                progress(done)
        return out
    chunks = [list(groups[i : i + CHUNK]) for i in range(0, len(groups), CHUNK)]
    ctx = multiprocessing.get_context("spawn")
    results: list[list[ComposeResult]] = []
    done = 0
    with ProcessPoolExecutor(
        max_workers=min(n, len(chunks)), mp_context=ctx, initializer=_worker_init
    ) as ex:
        for part in ex.map(compose_many, chunks):
            results.extend(part)
            done += sum(len(g) for g in part)
            if progress:
                progress(done)
    return results
