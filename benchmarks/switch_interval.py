"""chDB calls beside a busy Python thread, at several thread switch intervals
(``tally.process``, setting ``switch_interval_ms``).

Run: python -m benchmarks.switch_interval [rounds] — nothing asserted. Each round is the
worker's store pattern on a fresh chDB database: one commit-point insert into ``usage_minute``
(a progress row, token-deduplicated) and one read of the chain (``read_chain``). Printed per
interval: the rounds' wall time alone, then beside one thread that spins in Python (as the
worker's consumer loop does under load), their ratio, and how fast the spinning thread ran
meanwhile compared with running alone.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time

from clickhouse.sink import ClickHouseSink, link_insert_settings, progress_table
from clickhouse.store import Store

INTERVALS_S = (0.005, 0.002, 0.001, 0.0005)


class Spinner:
    """A thread that runs Python bytecode until stopped, counting its loops."""

    def __init__(self) -> None:
        self.loops = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for _ in range(1000):
                pass
            self.loops += 1

    def __enter__(self) -> Spinner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(f"chdb://{d}", "bench")
        store.migrate()
        sink = ClickHouseSink(store)
        offset = 0

        def work() -> float:
            nonlocal offset
            t0 = time.perf_counter()
            for _ in range(rounds):
                offset += 1
                store.insert_arrow(
                    "usage_minute",
                    progress_table("bench", 0, offset),
                    settings=link_insert_settings("bench", 0, offset),
                )
                sink.read_chain("bench", [0])
            return time.perf_counter() - t0

        work()  # warm-up
        for interval in INTERVALS_S:
            sys.setswitchinterval(interval)
            alone = work()
            with Spinner() as spin:
                time.sleep(0.5)
                t0, n0 = time.perf_counter(), spin.loops
                time.sleep(1.0)
                solo_rate = (spin.loops - n0) / (time.perf_counter() - t0)
                t0, n0 = time.perf_counter(), spin.loops
                beside = work()
                rate = (spin.loops - n0) / (time.perf_counter() - t0)
            print(
                f"switch interval {interval * 1000:.1f} ms: {rounds} rounds alone {alone:.2f} s, "
                f"beside a busy thread {beside:.2f} s ({beside / alone:.1f}x); the busy thread "
                f"ran at {rate / solo_rate:.0%} of its speed alone",
                flush=True,
            )
        store.close()


if __name__ == "__main__":
    main()
