"""Readiness evaluation of the stream workers (pure)."""

from __future__ import annotations

from schemas.worker import WorkerStatus
from streams.status import evaluate, stale_after_s

NOW = 1_700_000_000_000


def st(
    state: str = "running",
    *,
    age_s: float = 1,
    failing_for_s: float | None = None,
    error: str = "",
    wid: str = "w1",
    parts: tuple[int, ...] = (0, 1),
) -> WorkerStatus:
    return WorkerStatus(
        worker_id=wid,
        topic="t",
        state=state,
        beat_ms=NOW - int(age_s * 1000),
        started_ms=NOW - 600_000,
        last_commit_ms=NOW - 2_000,
        failing_since_ms=None if failing_for_s is None else NOW - int(failing_for_s * 1000),
        last_error=error,
        partitions=parts,
    )


def ev(*statuses: WorkerStatus):  # type: ignore[no-untyped-def]
    return evaluate(list(statuses), NOW, max_failing_s=10, stale_s=15)


def test_running_worker_is_ready_and_described() -> None:
    r = ev(st())
    assert r.ok and r.summary == "ok"
    (w,) = r.info["workers"]
    assert w["id"] == "w1" and w["partitions"] == [0, 1] and w["state"] == "running"
    assert w["last_commit_at"] == "2023-11-14T22:13:18.000Z"
    assert w["failing_since"] is None and w["status_age_s"] == 1.0


def test_no_worker_is_red() -> None:
    r = ev()
    assert not r.ok and r.summary == "no worker status in the last 15 s"


def test_stopped_or_starting_worker_is_red() -> None:
    assert ev(st("stopped")).summary == "stopped"
    assert ev(st("starting")).summary == "starting"
    assert ev(st("stopped"), st("running", wid="w2")).ok  # another one is running


def test_stale_heartbeat_is_not_a_live_worker() -> None:
    r = ev(st(age_s=16))
    assert not r.ok and "no worker status" in r.summary


def test_failing_longer_than_the_limit_is_red_with_the_error() -> None:
    assert ev(st(failing_for_s=9, error="commit: x")).ok  # within the limit: still ready
    r = ev(st(failing_for_s=42, error="commit: StoreUnavailable: down"))
    assert not r.ok
    assert r.summary == "cannot commit for 42 s: commit: StoreUnavailable: down"
    assert r.info["workers"][0]["failing_for_s"] == 42.0


def test_one_failing_worker_among_healthy_ones_is_red() -> None:
    r = ev(st(wid="a"), st(wid="b", failing_for_s=20))
    assert not r.ok and r.summary.startswith("cannot commit for 20 s")


def test_stale_after_is_three_heartbeats_at_least_ten_seconds() -> None:
    assert stale_after_s(5) == 15
    assert stale_after_s(0.5) == 10


# --- lag and freshness --------------------------------------------------------------------------

from streams.lag import LagReport, PartitionLag  # noqa: E402
from streams.status import evaluate_lag  # noqa: E402


def lag(report: LagReport | None, now: int = NOW):  # type: ignore[no-untyped-def]
    return evaluate_lag(report, now, max_lag=100, max_freshness_s=30, stale_s=15)


def test_lag_and_freshness_ok_under_thresholds() -> None:
    r = LagReport(NOW - 2_000, (PartitionLag(0, 10, 60, NOW - 5_000), PartitionLag(1, 3, 4)))
    lg, fr = lag(r)
    assert lg.ok and lg.summary == "ok" and lg.info["total"] == 49 and lg.info["max"] == 100
    assert fr.ok and fr.summary == "ok" and fr.info == {"seconds": 5.0, "max_s": 30}


def test_too_much_lag_names_the_worst_partition() -> None:
    r = LagReport(NOW, (PartitionLag(0, 10, 60), PartitionLag(1, -1, 80), PartitionLag(2, 0, 1)))
    lg, fr = lag(r)
    assert not lg.ok
    assert lg.summary == "129 messages wait unstored (max 100); partition 1 is 80 behind"
    assert fr.ok  # no timestamps: freshness unknown per partition counts as 0


def test_stuck_consumer_turns_freshness_red_whatever_the_lag() -> None:
    # one message waits, for 45 s: a small lag, but nothing moves
    r = LagReport(NOW - 1_000, (PartitionLag(0, 10, 12, NOW - 45_000), PartitionLag(1, 5, 6)))
    lg, fr = lag(r)
    assert lg.ok
    assert not fr.ok
    assert fr.summary == (
        "the oldest unstored message is 45 s old (max 30 s) in partitions 0: "
        "the worker is stuck or too slow"
    )


def test_missing_failed_or_stale_measurements_are_unknown_and_red() -> None:
    for report, why in (
        (None, "unknown: not measured yet"),
        (LagReport(NOW, error="TimeoutError: no answer"), "unknown: TimeoutError: no answer"),
        (LagReport(NOW - 20_000, (PartitionLag(0, 1, 2),)), "unknown: last measured 20 s ago"),
    ):
        lg, fr = lag(report)
        assert not lg.ok and not fr.ok
        assert lg.summary == fr.summary == why
