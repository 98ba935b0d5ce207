"""Summaries of py-spy's raw output (pure: the text is made up here)."""

from __future__ import annotations

import pytest

from benchmarks.profile import component, render, summarise, thread_name
from benchmarks.target import REPO, BenchError

SITE = "/venv/lib/python3.11/site-packages"
STD = "/usr/lib/python3.11"


def _fake_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.profile as p

    monkeypatch.setattr(p, "_SITE", [SITE])
    monkeypatch.setattr(p, "_STDLIB", STD)


def test_components_of_files(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_paths(monkeypatch)
    assert component(f"{REPO}/streams/processor.py") == "streams"
    assert component(f"{SITE}/clickhouse_connect/driver/insert.py") == "clickhouse_connect"
    assert component(f"{STD}/asyncio/base_events.py") == "stdlib:asyncio"
    assert component(f"{STD}/threading.py") == "stdlib:threading"


def test_thread_names() -> None:
    assert thread_name("thread (123): tally-flush_0") == "tally-flush_0"
    assert thread_name("thread (0x7F01)") == "tid 0x7F01"


def test_summary_counts_work_by_thread_function_and_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_paths(monkeypatch)
    flush = (
        f"thread (11): tally-flush_0;Thread.run ({STD}/threading.py:982);"
        f"BatchProcessor.flush_batch ({REPO}/streams/processor.py:250);"
        f"Store.insert ({REPO}/clickhouse/store.py:170);"
        f"insert ({SITE}/clickhouse_connect/driver/client.py:600)"
    )
    flush2 = (
        f"thread (12): tally-flush_1;Thread.run ({STD}/threading.py:982);"
        f"BatchProcessor.flush_batch ({REPO}/streams/processor.py:250)"
    )
    api = (
        f"thread (1): MainThread;run ({STD}/asyncio/base_events.py:600);"
        f"parse_native ({REPO}/api/ingest_parse.py:250)"
    )
    lib_only = f"thread (1): MainThread;_run_once ({STD}/asyncio/base_events.py:1900)"
    idle = (
        f"thread (13): AnyIO worker thread;Queue.get ({STD}/queue.py:171);"
        f"Condition.wait ({STD}/threading.py:327)"
    )
    raw = "\n".join(
        [f"{flush} 50", f"{flush2} 10", f"{api} 30", f"{lib_only} 10", f"{idle} 400", ""]
    )
    s = summarise(raw, ticks=100)
    assert s["samples"] == 100
    assert s["idle_samples"] == 400
    assert s["cores"] == pytest.approx(1.0)
    by_thread = {r["name"]: r for r in s["by_thread"]}
    assert by_thread["tally-flush_*"]["share"] == pytest.approx(0.6)  # pool threads grouped
    assert by_thread["MainThread"]["cores"] == pytest.approx(0.4)
    assert "AnyIO worker thread" not in by_thread
    callers = {r["name"]: r["share"] for r in s["by_first_party_caller"]}
    assert callers["Store.insert (clickhouse/store.py)"] == pytest.approx(0.5)
    assert callers["BatchProcessor.flush_batch (streams/processor.py)"] == pytest.approx(0.1)
    assert callers["parse_native (api/ingest_parse.py)"] == pytest.approx(0.3)
    assert callers["[stdlib:asyncio] _run_once"] == pytest.approx(0.1)
    inclusive = {r["name"]: r["share"] for r in s["top_inclusive"]}
    assert inclusive["BatchProcessor.flush_batch (streams/processor.py)"] == pytest.approx(0.6)
    assert not any("threading.py" in name for name in inclusive)  # scaffolding left out
    comps = {r["name"]: r["share"] for r in s["by_component"]}
    assert comps["clickhouse_connect"] == pytest.approx(0.5)
    text = render(s)
    assert "tally-flush_*" in text and "Store.insert" in text


def test_an_empty_profile_is_an_error() -> None:
    with pytest.raises(BenchError):
        summarise("", ticks=10)
