"""`tally run` hands its settings to its API child as TALLY_* variables (runtime.split): every
setting must come back the same, secrets and durations included."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from runtime.split import settings_env
from tally.settings import EmbeddedProcesses, Settings, WaitMode


def test_every_setting_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    given = Settings(  # type: ignore[call-arg]
        data_dir=Path("/tmp/some dir"),
        kafka_bootstrap="127.0.0.1:9092",
        clickhouse_url="http://127.0.0.1:8123",
        secrets_key=SecretStr("s3cr3t=="),
        ingest_wait=WaitMode.STORED,
        dedupe_horizon=timedelta(days=40, seconds=1.5),
        embedded_processes=EmbeddedProcesses.SINGLE,
        api_port=0,
    )
    for name in list(os.environ):
        if name.startswith("TALLY_"):
            monkeypatch.delenv(name)
    for k, v in settings_env(given).items():
        monkeypatch.setenv(k, v)
    back = Settings()  # type: ignore[call-arg]
    assert back.model_dump() == given.model_dump()
    assert back.secrets_key.get_secret_value() == "s3cr3t=="
