"""Micro-benchmark of the worker's matching + minute aggregation (``streams.columnar.aggregate``)
on one realistic link, nothing else (no broker, no store).

Run: python -m benchmarks.aggregate_micro [events] [repeats] — prints the link size, the wall
seconds (best, median) and CPU seconds (median; the steadier figure on a shared machine) per
``aggregate`` call. The link: ``events`` kept events
of one tenant and type, 1k customers drawn from a Zipf law, times spread over 10 minutes, four
properties (an integer ``bytes``, a ``region``, a ``user`` among 300, a short text); five meters:
count, sum with group_by, max with a filter, unique_count, latest.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from datetime import UTC, datetime

from schemas.meters import Meter
from streams.columnar import KeptEvents, aggregate
from streams.matching import CompiledMeter, MeterIndex

T0 = 1_700_000_000_000


def meters() -> list[Meter]:
    def m(slug: str, agg: str, **kw: object) -> Meter:
        return Meter(  # type: ignore[call-arg]
            slug=slug,
            event_type="api",
            aggregation=agg,  # type: ignore[arg-type]
            id=f"id-{slug}",
            tenant_id="t1",
            created_at=datetime(2020, 1, 1, tzinfo=UTC),
            **kw,  # type: ignore[arg-type]
        )

    return [
        m("calls", "count"),
        m("bytes", "sum", value_property="$.bytes", group_by={"region": "$.region"}),
        m(
            "eu_max",
            "max",
            value_property="$.bytes",
            filters=[{"property": "$.region", "op": "eq", "value": "eu"}],
        ),
        m("users", "unique_count", value_property="$.user"),
        m("last", "latest", value_property="$.bytes"),
    ]


def link(n: int, seed: int = 7) -> KeptEvents:
    rnd = random.Random(seed)
    weights = [1 / (k + 1) for k in range(1000)]
    customers = rnd.choices([f"cust-{k}" for k in range(1000)], weights, k=n)
    kept = KeptEvents()
    for i in range(n):
        kept.tenants.append("t1")
        kept.ids.append(f"evt-{i:08d}")
        kept.types.append("api")
        kept.customers.append(customers[i])
        kept.times_ms.append(T0 + rnd.randrange(600_000))
        kept.properties.append(
            {
                "bytes": rnd.randrange(100_000),
                "region": ("eu", "us", "ap")[i % 3],
                "user": f"u{rnd.randrange(300)}",
                "path": "/v1/things",
            }
        )
        kept.offsets.append(i)
    return kept


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    kept = link(n)
    index = MeterIndex(meters())

    def always(cm: CompiledMeter) -> int | None:
        return -1

    result = aggregate(kept, index, always)  # warm-up
    times = []
    cpu = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        aggregate(kept, index, always)
        cpu.append(time.process_time() - c0)
        times.append(time.perf_counter() - t0)
    med, cmed = statistics.median(times), statistics.median(cpu)
    print(
        f"{n} events, {result.windows} windows, per call: wall best {min(times):.4f} s, "
        f"median {med:.4f} s; CPU median {cmed:.4f} s ({n / cmed:,.0f} events per CPU-second)"
    )


if __name__ == "__main__":
    main()
