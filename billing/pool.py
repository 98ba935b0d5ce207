"""The rating worker pool of an invoice run.

Rating is pure Python (CPU-bound), so threads would share one core through the GIL: large runs
are composed in worker PROCESSES (``spawn``: a fresh interpreter that imports only billing,
rating and schemas, never the store). Small runs (or ``workers=1``) are composed inline, since
starting a process costs more than rating a few hundred invoices.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

from billing.compose import ComposeInput, ComposeResult, compose_many

log = logging.getLogger(__name__)

INLINE_MAX = 400  # invoices: below this, no processes
CHUNK = 250  # subscriptions per task


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
    with ProcessPoolExecutor(max_workers=min(n, len(chunks)), mp_context=ctx) as ex:
        for part in ex.map(compose_many, chunks):
            results.extend(part)
            done += sum(len(g) for g in part)
            if progress:
                progress(done)
    return results
