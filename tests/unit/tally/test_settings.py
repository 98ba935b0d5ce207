from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from tally.settings import Settings, WaitMode


def test_defaults_are_embedded_and_wait_for_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("TALLY_KAFKA_BOOTSTRAP", "TALLY_INGEST_WAIT", "TALLY_CLICKHOUSE_URL"):
        monkeypatch.delenv(k, raising=False)
    s = Settings()
    assert s.embedded
    assert s.effective_ingest_wait is WaitMode.STORED
    assert s.max_events_per_request == 1000
    assert s.max_request_bytes == 1024 * 1024
    assert s.dedupe_horizon == timedelta(days=35)


def test_env_is_read_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALLY_KAFKA_BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("TALLY_MAX_EVENTS_PER_REQUEST", "50")
    monkeypatch.setenv("TALLY_LOG_LEVEL", "debug")
    s = Settings()
    assert not s.embedded
    assert s.effective_ingest_wait is WaitMode.BROKER
    assert s.max_events_per_request == 50
    assert s.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_events_per_request", 0),
        ("flush_interval_s", 2.0),
        ("api_port", 70000),
        ("clickhouse_database", "bad-name;drop"),
        ("log_level", "LOUD"),
        ("events_partitions", 0),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(**{field: value})
    assert field in str(err.value)


def test_dedupe_horizon_must_cover_lateness() -> None:
    with pytest.raises(ValidationError, match="dedupe_horizon"):
        Settings(dedupe_horizon=timedelta(days=1), max_lateness=timedelta(days=2))
