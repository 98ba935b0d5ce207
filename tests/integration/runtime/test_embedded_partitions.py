"""`tally run` fixes the events topic's partition count per data directory (runtime.roles
``embedded_partitions``): the dedupe index is one file per partition number, so a changed count
would let a retried event slip past it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.roles import EMBEDDED_PARTITIONS, PARTITIONS_FILE, embedded_partitions
from tally.errors import ValidationError
from tally.settings import Settings

REPO = Path(__file__).resolve().parents[3]


def _settings(data_dir: Path, **given: object) -> Settings:
    return Settings(data_dir=data_dir, **given)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _no_partition_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TALLY_EVENTS_PARTITIONS", raising=False)


def test_a_new_directory_gets_the_embedded_default_and_keeps_it(tmp_path: Path) -> None:
    assert embedded_partitions(_settings(tmp_path), tmp_path) == EMBEDDED_PARTITIONS == 1
    assert (tmp_path / PARTITIONS_FILE).read_text().strip() == "1"
    assert embedded_partitions(_settings(tmp_path), tmp_path) == 1


def test_an_explicit_count_is_pinned_and_a_different_one_refused(tmp_path: Path) -> None:
    assert embedded_partitions(_settings(tmp_path, events_partitions=6), tmp_path) == 6
    assert embedded_partitions(_settings(tmp_path), tmp_path) == 6  # unset: the directory's
    assert embedded_partitions(_settings(tmp_path, events_partitions=6), tmp_path) == 6
    with pytest.raises(ValidationError) as err:
        embedded_partitions(_settings(tmp_path, events_partitions=4), tmp_path)
    assert err.value.details[0]["field"] == "events_partitions"
    assert "created with 6 partitions" in err.value.message
    assert (tmp_path / PARTITIONS_FILE).read_text().strip() == "6"


def test_a_directory_from_before_the_file_keeps_its_index_count(tmp_path: Path) -> None:
    dedupe = tmp_path / "dedupe"
    dedupe.mkdir()
    for p in range(8):  # what `tally run` left with the old default of 8
        (dedupe / f"partition-{p}.sqlite").touch()
    (dedupe / "partition-x.sqlite").touch()  # not an index file of a partition
    assert embedded_partitions(_settings(tmp_path), tmp_path) == 8
    assert (tmp_path / PARTITIONS_FILE).read_text().strip() == "8"
    with pytest.raises(ValidationError):
        embedded_partitions(_settings(tmp_path, events_partitions=2), tmp_path)


def test_a_damaged_file_is_named(tmp_path: Path) -> None:
    (tmp_path / PARTITIONS_FILE).write_text("eight\n")
    with pytest.raises(ValidationError) as err:
        embedded_partitions(_settings(tmp_path), tmp_path)
    assert str(tmp_path / PARTITIONS_FILE) in err.value.message


@pytest.mark.parametrize("mode", ["split", "single"])
def test_tally_run_refuses_a_changed_count_before_starting_anything(
    tmp_path: Path, mode: str
) -> None:
    (tmp_path / PARTITIONS_FILE).write_text("2\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_EVENTS_PARTITIONS="3", TALLY_EMBEDDED_PROCESSES=mode)
    proc = subprocess.run(
        [sys.executable, "-m", "runtime", "run", "--data-dir", str(tmp_path), "--port", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "events_partitions=3" in proc.stderr and "created with 2 partitions" in proc.stderr
    assert not (tmp_path / "clickhouse").exists()  # nothing was started
