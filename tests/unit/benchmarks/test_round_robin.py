"""The order and the budget of the query timings (``benchmarks.queries.round_robin``): made-up
durations, no server."""

from __future__ import annotations

from benchmarks.queries import MIN_N, round_robin


def test_every_shape_takes_its_turn_at_each_query() -> None:
    calls: list[tuple[str, int]] = []

    def run(name: str, i: int) -> tuple[float, int]:
        calls.append((name, i))
        return 0.001 * (i + 1), i

    kept = round_robin(["a", "b", "c"], 3, 0, None, run)
    # the first query of every shape before the second of any: no shape pays a cold start alone
    assert calls == [(n, i) for i in range(3) for n in ("a", "b", "c")]
    assert kept["b"] == ([0.001, 0.002, 0.003], [0, 1, 2])


def test_warmup_queries_run_but_are_not_kept() -> None:
    seen: list[int] = []

    def run(name: str, i: int) -> tuple[float, int]:
        seen.append(i)
        return float(i), 10 + i

    kept = round_robin(["a"], 5, 2, None, run)
    assert seen == [0, 1, 2, 3, 4]
    assert kept["a"] == ([2.0, 3.0, 4.0], [12, 13, 14])


def test_a_slow_shape_stops_at_its_budget_and_never_below_min_n() -> None:
    progress: list[tuple[int, int, str]] = []

    def run(name: str, i: int) -> tuple[float, int]:
        return (1.0 if name == "slow" else 0.001), 1

    def shown(done: int, total: int, name: str) -> None:
        progress.append((done, total, name))

    kept = round_robin(["fast", "slow"], MIN_N + 30, 0, 5.0, run, shown)
    assert len(kept["fast"][0]) == MIN_N + 30  # far under the budget: every query
    assert len(kept["slow"][0]) == MIN_N  # over the budget after 5 queries, kept to MIN_N
    # progress counts the queries run, out of every query planned
    assert [d for d, _, _ in progress] == list(range(1, 2 * MIN_N + 31))
    assert {t for _, t, _ in progress} == {2 * (MIN_N + 30)}
