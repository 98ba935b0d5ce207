"""``python -m benchmarks --quick`` (what CI runs) produces valid output: the result JSON follows
its schema, the plots are PNG images, the Markdown summary has its sections. Timings are never
checked: the figures depend on the machine."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.queries import SHAPES
from benchmarks.report import PLOTS, RESULT_FILE, SUMMARY_FILE, validate
from tests.support.modules import run_module

PNG = b"\x89PNG\r\n\x1a\n"


def test_quick_run_writes_valid_results(tmp_path: Path) -> None:
    out = tmp_path / "run"
    work = tmp_path / "work"
    work.mkdir()
    run_module("benchmarks", "--quick", "--out", str(out), "--work-dir", str(work), timeout=900)

    doc = json.loads((out / RESULT_FILE).read_text())
    r = validate(doc)  # the schema: every section present and typed
    assert r.quick and r.mode == "embedded"
    assert r.git.commit != "unknown"
    assert r.versions["chdb"] != "not installed"

    # Every figure was measured (not skipped) and the counts add up.
    ing = r.ingest
    assert ing.steps and all(s.accepted_events_per_s > 0 for s in ing.steps)
    assert all(s.tally_cpu_cores is not None and s.machine_busy_cores > 0 for s in ing.steps)
    # the main process by its threads: the worker's Python threads always work under load
    for x in [*ing.steps, ing.sequential, ing.half_load]:
        assert x.main_python_cores is not None and x.main_python_cores > 0, x
        assert x.main_merge_cores is not None and x.main_native_cores is not None, x
    assert ing.max_stored_events_per_s > 0
    assert ing.sequential.requests > 0 and ing.sequential.latency_p99_s is not None
    assert ing.half_load.requests > 0 and ing.half_load.freshness.n > 0
    assert ing.count_check.ok, ing.count_check
    assert r.count_check_final.ok, r.count_check_final
    assert ing.profile is not None and ing.profile.summary.samples > 0
    # split mode (the default): the API child is profiled too, its threads named apart
    assert any(t.name.startswith("api ") for t in ing.profile.summary.by_thread)
    assert (out / "profile.txt").read_text().startswith("samples:")
    assert (out / "profile.raw.gz").stat().st_size > 0
    assert r.ceilings.broker.consumed_msgs > 0

    # One volume point after the ramp, one on a fresh store with written history, both queried
    # with every shape.
    assert len(r.volumes) == 2
    written = r.volumes[1]
    assert written.target_events is not None and written.history is not None
    assert written.history.events_written > 0
    assert written.history.events_rows >= written.target_events
    assert written.stored_events >= written.target_events
    assert written.start is not None and written.direct_queries
    assert written.burst is not None and r.volumes[0].burst is None
    assert r.volume_setup is not None
    for v in r.volumes:
        assert set(v.queries) == {s.name for s in SHAPES}
        assert v.memory.tally_peak_mb > 0
    assert r.memory_samples

    # Ratios to the ceilings are there and positive.
    for key in (
        "stored_max/broker_produce",
        "stored_max/store_insert",
        "stored_max/json_envelope_parse",
    ):
        assert r.ratios[key] is not None and r.ratios[key] > 0

    for name in PLOTS.values():
        assert (out / name).read_bytes()[:8] == PNG, name
    md = (out / SUMMARY_FILE).read_text()
    for heading in (
        "## Ceilings",
        "## Ingest and storage",
        "## Queries",
        "## Memory",
        "## Profile",
    ):
        assert heading in md
    for name in PLOTS.values():
        assert f"({name})" in md
    assert "| step | Python | merges | native | API process |" in md

    # The embedded data directory is removed and `tally run` stopped cleanly.
    assert list(work.iterdir()) == []
    assert doc["stop_exit_code"] == 0
