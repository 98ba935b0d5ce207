"""Micro-benchmark of the load generator's per-event cost: building and serialising request bodies.

Run: python -m benchmarks.gen_micro [batches] [rounds] — in the same process, alternately,
``rounds`` times: ``batches`` bodies of 1000 events (4 tenants in turn, the default workload:
1000 customers, Zipf 1.1, 2 % duplicates, 1 % late) built the earlier way (``EventFactory.batch``
+ ``orjson.dumps``) and the load generator's way (``BodyFactory.body``). Prints, per path, the
median CPU time per event (``time.process_time``: the steadier figure on a shared machine) and
events per CPU-second, and the ratio new/old.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import orjson

from benchmarks.workload import BodyFactory, EventFactory

BATCH = 1000
TENANTS = 4
WORKLOAD = {"customers": 1000, "zipf_s": 1.1, "dup_rate": 0.02, "late_rate": 0.01}


def old_path(seed: int) -> Callable[[int, int], int]:
    f = EventFactory(seed, "micro-old-", **WORKLOAD)  # type: ignore[arg-type]

    def one(tenant: int, now_ms: int) -> int:
        events, _new = f.batch(tenant, BATCH, now_ms)
        return len(orjson.dumps(events))

    return one


def new_path(seed: int) -> Callable[[int, int], int]:
    f = BodyFactory(seed, "micro-new-", **WORKLOAD)  # type: ignore[arg-type]

    def one(tenant: int, now_ms: int) -> int:
        body, _new = f.body(tenant, BATCH, now_ms)
        return len(body)

    return one


def cpu_per_event(one: Callable[[int, int], int], batches: int) -> tuple[float, float]:
    """(CPU seconds per event, mean body bytes per event) of ``batches`` bodies."""
    now = int(time.time() * 1000)
    size = 0
    c0 = time.process_time()
    for i in range(batches):
        size += one(i % TENANTS, now + i)
    return (time.process_time() - c0) / (batches * BATCH), size / (batches * BATCH)


def main() -> None:
    batches = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    paths = {"old (EventFactory + orjson.dumps)": old_path(1), "new (BodyFactory)": new_path(1)}
    for one in paths.values():
        cpu_per_event(one, 5)  # warm-up (tables, caches)
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    size: dict[str, float] = {}
    for _ in range(rounds):
        for name, one in paths.items():
            c, size[name] = cpu_per_event(one, batches)
            cpu[name].append(c)
    med = {name: statistics.median(v) for name, v in cpu.items()}
    for name in paths:
        print(
            f"{name}: {med[name] * 1e6:.3f} us CPU per event "
            f"({1 / med[name]:,.0f} events per CPU-second), {size[name]:.0f} bytes per event"
        )
    old, new = med.values()
    print(
        f"{batches} x {BATCH}-event bodies, median of {rounds} rounds: new is {old / new:.1f}x "
        "cheaper per event"
    )


if __name__ == "__main__":
    main()
