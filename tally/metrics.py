"""Metrics plumbing shared by every process: the one registry of a process, and a counter whose
label takes only a bounded set of values (per-tenant throughput).

Each process has ONE registry (``process_registry()``), made by its entry point and handed to
the API's ``api.state.Metrics`` and the worker's ``streams.metrics.WorkerMetrics``; it also
carries the process collectors (``process_resident_memory_bytes``, ``process_cpu_seconds_total``,
open fds, ``python_gc_*``, ``python_info``). Nothing registers on prometheus-client's global
default registry: two apps in one test process share nothing.

``TopTenantCounter`` exports ``<name>_total{<label>}`` for at most ``top_n`` label values plus
``other`` (or for a fixed allow-list plus ``other``), so a system with a million tenants still
exports a handful of series. Which values get their own series, in top-N mode:

- while fewer than ``top_n`` values have a series, a new value gets one at its first increment
  (with few tenants every tenant is exact from the start);
- otherwise the value's increments go to ``other``, and its recent volume is tracked in a bounded
  table (space-saving: at most ``8 * top_n`` candidates, at least 64). Every ``review_s`` a
  candidate whose recent volume is more than twice that of the quietest labelled value takes its
  place (hysteresis: no flapping between two similar tenants); recent volumes then halve.

Every exported series only grows while it is exported: a value that gets a series starts at 0,
one that loses it stops being exported (Prometheus sees the series end), and ``other`` counts
the increments made while a value had no series. Nothing is ever subtracted, so ``rate()`` over
any series, and the sum over all series, are right.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

OTHER = "other"


def process_registry() -> CollectorRegistry:
    """A new registry with the process collectors (RSS, CPU, fds, GC, Python version)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def parse_allow_list(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")`` (order kept, duplicates dropped)."""
    out: list[str] = []
    for part in text.split(","):
        v = part.strip()
        if v and v not in out:
            out.append(v)
    return tuple(out)


class TopTenantCounter(Collector):
    """A counter with one label whose values are bounded (see the module docstring)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        *,
        top_n: int = 10,
        allow: Iterable[str] = (),
        review_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if top_n < 0:
            raise ValueError("top_n must be >= 0")
        self.name = name
        self.documentation = documentation
        self.label = label
        self.allow = frozenset(allow)
        self.top_n = top_n
        self.review_s = review_s
        self.capacity = max(64, 8 * top_n)
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[str, float] = {}  # label value -> count since it got its series
        self._other = 0.0
        self._recent: dict[str, float] = {}  # candidate -> recent volume (space-saving)
        self._next_review = clock() + review_s
        self.retired = 0.0  # counts of series that were dropped (for checks: nothing is lost)
        if self.allow:
            self._series = dict.fromkeys(sorted(self.allow), 0.0)
        if registry is not None:
            registry.register(self)

    # --- counting ---------------------------------------------------------------------------
    def inc(self, value: str, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        with self._lock:
            if not self.allow and self.top_n:
                self._note(value, amount)
            if value in self._series:
                self._series[value] += amount
            elif not self.allow and len(self._series) < self.top_n and value != OTHER:
                self._series[value] = amount
            else:
                self._other += amount
            if not self.allow and self.top_n and self._clock() >= self._next_review:
                self._review()

    def _note(self, value: str, amount: float) -> None:
        recent = self._recent
        if value in recent:
            recent[value] += amount
        elif len(recent) < self.capacity:
            recent[value] = amount
        else:  # space-saving: the new value takes the slot of the smallest, inheriting its count
            smallest = min(recent, key=recent.__getitem__)
            floor = recent.pop(smallest)
            recent[value] = floor + amount

    def _review(self) -> None:
        self._next_review = self._clock() + self.review_s
        recent = self._recent
        ranked = sorted(recent, key=lambda v: (-recent[v], v))
        dropped: set[str] = set()
        for cand in ranked[: self.top_n]:
            if cand in self._series or cand == OTHER or cand in dropped:
                continue
            if len(self._series) < self.top_n:
                self._series[cand] = 0.0
                continue
            quietest = min(self._series, key=lambda v: (recent.get(v, 0.0), v))
            if recent[cand] > 2 * recent.get(quietest, 0.0):
                self.retired += self._series.pop(quietest)
                dropped.add(quietest)
                self._series[cand] = 0.0
        for v in list(recent):
            recent[v] /= 2
            if recent[v] < 1:
                del recent[v]

    # --- reading ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, float]:
        """The exported series: label value -> count (``other`` always present)."""
        with self._lock:
            out = dict(self._series)
            out[OTHER] = self._other
            return out

    def total(self) -> float:
        """Every increment ever made (exported series + ``other`` + dropped series)."""
        with self._lock:
            return sum(self._series.values()) + self._other + self.retired

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=[self.label])]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, count in sorted(self.snapshot().items()):
            family.add_metric([value], count)
        yield family
