"""Micro-benchmark of the ingest API's CPU per event before the broker: decode and validate a
request body, group its events into envelopes (``api.ingest_parse``, ``schemas.envelope``), on the
harness's bodies (``benchmarks.workload.BodyFactory``: 1000 native events, four properties, Zipf
customers, a few duplicates and late events). No HTTP, broker or store.

Run: python -m benchmarks.ingest_micro [bodies] [rounds] -- prints microseconds of CPU per event
for each path (the minimum over ``rounds`` rounds, the paths taking turns within a round):

- ``general``: ``load_json`` (orjson) + ``parse_native`` + ``group_columns``, the path every
  body took before the one-call decoder, and the one any body with a problem still takes;
- ``decoder``: ``parse_native_body`` (msgspec, the times read in bulk, columns without a tuple
  per event) + ``group_columns``, the path a body of valid events takes now;

and their ratio. Both paths are checked to give the same events first.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from api.ingest_parse import Limits, as_items, load_json, parse_native, parse_native_body
from benchmarks.workload import BodyFactory
from schemas.envelope import EventColumns, group_columns

TENANT = "tenant-bench"
LIMITS = Limits(max_events=10_000, max_lateness_ms=7 * 86_400_000, max_future_ms=3_600_000)


def _general(raw: bytes, now_ms: int) -> EventColumns:
    return EventColumns.of_rows(parse_native(as_items(load_json(raw)), now_ms, LIMITS).rows)


def _decoder(raw: bytes, now_ms: int) -> EventColumns:
    res = parse_native_body(raw, now_ms, LIMITS)
    if res is None:
        raise SystemExit("a harness body did not take the one-call decoder")
    return res


def main(n_bodies: int = 20, rounds: int = 25) -> dict[str, float]:
    factory = BodyFactory(7, "bench", 1000, 1.1, 0.02, 0.01)
    now_ms = time.time_ns() // 1_000_000
    bodies = [factory.body(0, 1000, now_ms)[0] for _ in range(n_bodies)]
    events = n_bodies * 1000
    for raw in bodies:
        if _general(raw, now_ms) != _decoder(raw, now_ms):
            raise SystemExit("the two paths gave different events")
    paths: dict[str, Callable[[bytes, int], EventColumns]] = {
        "general": _general,
        "decoder": _decoder,
    }
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(rounds):
        for name, parse in paths.items():
            t0 = time.process_time()
            for raw in bodies:
                group_columns(TENANT, now_ms, parse(raw, now_ms), 1)
            best[name] = min(best[name], (time.process_time() - t0) / events * 1e6)
    for name, us in best.items():
        print(f"{name:8s} {us:6.3f} us CPU per event (min of {rounds} rounds, {events} events)")
    print(f"decoder / general: {best['decoder'] / best['general']:.2f}")
    return best


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    main(*args)
