"""The one settings object. Environment variables are read here and nowhere else.

Every setting can be given as ``TALLY_<NAME>`` (e.g. ``TALLY_KAFKA_BOOTSTRAP``). ``tally run``
(embedded mode) fills ``kafka_bootstrap`` and ``clickhouse_url`` itself when they are empty.
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class EmbeddedProcesses(StrEnum):
    """How `tally run` lays out its processes (docs/deploy.md)."""

    SPLIT = "split"  # the API in a child process, the worker + chDB in the main one
    SINGLE = "single"  # everything in one process (one GIL)


class WaitMode(StrEnum):
    """When the ingest endpoint answers."""

    BROKER = "broker"  # after the broker acknowledged every event (acks=all)
    STORED = "stored"  # after the worker stored every event in ClickHouse


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TALLY_", extra="ignore", validate_default=True)

    # --- where things live -------------------------------------------------------------------
    data_dir: Path = Field(Path(".tally"), description="Embedded mode: chDB, dedupe index, state")
    kafka_bootstrap: str = Field("", description="host:port[,host:port]; empty = embedded Tansu")
    clickhouse_url: str = Field(
        "", description="http(s)://user:pass@host:8123/db or chdb:///dir; empty = embedded chDB"
    )
    clickhouse_database: str = Field("tally", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    # --- topics and consumer group -----------------------------------------------------------
    events_topic: str = Field("tally.events", min_length=1)
    events_partitions: int = Field(8, ge=1, le=1024)
    consumer_group: str = Field("tally-worker", min_length=1)
    broker_session_timeout_s: float = Field(10.0, gt=0)

    # --- HTTP --------------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    admin_token: str = Field("", description="Fixed admin token; empty = generate on first start")
    metrics_token: str = Field("", description="Bearer token /metrics requires; empty = open")
    max_inflight_requests: int = Field(
        256, ge=1, description="Requests served at once by one API process; beyond: 503"
    )
    max_inflight_events: int = Field(
        200_000, ge=1, description="Ingest events in flight in one API process; beyond: 503"
    )
    meter_cache_ttl_s: float = Field(
        2.0,
        ge=0,
        le=300,
        description="A usage query's meter, and whether it has a backfill run or corrections, "
        "is looked up again after this long (0 = every query)",
    )

    # --- credentials (docs/operations.md) ----------------------------------------------------
    auth_positive_ttl_s: float = Field(
        5.0, gt=0, le=300, description="A valid key is re-checked after this long: revocation bound"
    )
    auth_negative_ttl_s: float = Field(
        60.0, gt=0, le=3600, description="An unknown/revoked key is remembered this long"
    )
    auth_cache_max_entries: int = Field(10_000, ge=16, description="Per cache (valid, invalid)")
    auth_failure_burst: int = Field(
        20, ge=1, description="Failed authentications one client address may make at once"
    )
    auth_failures_per_s: float = Field(
        1.0, gt=0, description="... then this many per second; beyond: 429"
    )
    auth_lookups_per_s: float = Field(
        20.0, gt=0, description="Store lookups of never-seen credentials per API process"
    )
    counters_flush_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Key last-used times and quota counts are written this often",
    )

    # --- per-tenant limits (defaults; overrides per tenant through the admin API) ------------
    tenant_requests_per_s: float = Field(1000.0, ge=0, description="0 = unlimited")
    tenant_events_per_s: float = Field(50_000.0, ge=0, description="0 = unlimited")
    tenant_max_batch_events: int = Field(
        0, ge=0, description="0 = only each ingest flavour's own request limits"
    )
    tenant_monthly_events: int = Field(
        0, ge=0, description="Accepted events per UTC month; 0 = unlimited"
    )
    rate_limit_burst_s: float = Field(
        1.0, gt=0, le=60, description="Bucket size in seconds of rate"
    )
    limits_cache_ttl_s: float = Field(5.0, gt=0, le=300, description="Per-tenant limits re-read")
    cache_keep_warm_s: float = Field(
        300.0,
        ge=0,
        le=86_400,
        description="API keys, meters and tenant limits used within this long are re-read in "
        "the background before their cache TTL ends, so requests do not wait for the store "
        "(0 = only on use)",
    )
    api_replicas: int = Field(
        1, ge=1, description="API processes sharing the limits: each enforces limit / replicas"
    )
    quota_retry_after_max_s: int = Field(
        300, ge=1, description="Retry-After cap of a used-up quota"
    )

    # --- ingest ------------------------------------------------------------------------------
    max_events_per_request: int = Field(1000, ge=1)
    max_request_bytes: int = Field(1024 * 1024, ge=1024)
    ingest_wait: WaitMode | None = Field(
        None, description="Default ingest wait mode; None = stored in embedded mode, else broker"
    )
    wait_stored_timeout_s: float = Field(10.0, gt=0)
    max_lateness: timedelta = Field(timedelta(days=35))
    max_future: timedelta = Field(timedelta(minutes=5))
    envelope_max_events: int = Field(1000, ge=1)
    produce_timeout_s: float = Field(10.0, gt=0)
    retry_after_s: int = Field(5, ge=1)

    # --- embedded broker supervision (tally run) ---------------------------------------------
    broker_max_restarts: int = Field(
        5, ge=0, description="Restarts of a dead embedded broker per broker_restart_window_s"
    )
    broker_restart_window_s: float = Field(600.0, gt=0)
    embedded_processes: EmbeddedProcesses = Field(
        EmbeddedProcesses.SPLIT,
        description="tally run: 'split' = the HTTP API in its own process (its own core), the "
        "worker + chDB in the main one; 'single' = everything in one process",
    )
    api_max_restarts: int = Field(
        5,
        ge=0,
        description="split mode: restarts of a dead API process per broker_restart_window_s",
    )

    # --- worker ------------------------------------------------------------------------------
    dedupe_horizon: timedelta = Field(timedelta(days=35))
    dedupe_filter_max_mb: float = Field(
        16.0,
        ge=0,
        le=4096,
        description="Memory per partition for the in-memory id filter in front of the dedupe "
        "index (2 bytes per id; past its size it answers 'ask the index' more often). 0 = no "
        "filter: every lookup reads the index file",
    )
    flush_interval_s: float = Field(0.5, gt=0, le=1.0)
    flush_max_events: int = Field(50_000, ge=1)
    flush_thread_nice: int = Field(
        -10,
        ge=-20,
        le=19,
        description="CPU priority (nice, -20..19) of the worker's flush thread and the dedupe "
        "index threads it starts, on Linux: the serial step of the stored rate goes first when "
        "the cores are shared with the API, the broker and the store's merges. A negative value "
        "needs CAP_SYS_NICE (root or --cap-add SYS_NICE); without it the thread keeps its "
        "priority (logged once). 0 = leave it (tally.process.thread_nice)",
    )
    meters_file: Path | None = None
    worker_start_timeout_s: float = Field(
        60.0, gt=0, description="A worker that has no ready partitions by then fails to start"
    )
    worker_heartbeat_s: float = Field(
        5.0, gt=0, description="How often a worker writes its status to worker_heartbeats"
    )
    worker_max_failing_s: float = Field(
        10.0, gt=0, description="/readyz is red when the worker cannot commit for longer"
    )
    link_max_age_s: float = Field(
        300.0,
        gt=0,
        le=1800,
        description="A commit retried this long is redone from a fresh read of the store "
        "(keep far below the time usage_minute's deduplication window lasts)",
    )
    dead_letter_max_payload_bytes: int = Field(
        1 << 20,
        ge=1024,
        le=64 << 20,
        description="Bytes of a dead letter's payload kept (a longer one is cut and cannot be "
        "re-driven); docs/operations.md, Dead letters",
    )

    # --- invoicing (docs/invoicing.md) ---------------------------------------------------------
    invoice_grace: timedelta = Field(
        timedelta(hours=1),
        description="Usage arriving this long after a period end is billed on it",
    )
    invoice_auto_finalize: bool = Field(
        False, description="Finalize invoices when a run creates them"
    )
    invoice_run_workers: int = Field(
        0, ge=0, le=64, description="Rating processes; 0 = one per core"
    )
    invoice_adjustment_lookback: timedelta = Field(
        timedelta(days=120),
        description="How far back finalized periods are re-rated for late usage",
    )
    invoice_run_lease_s: float = Field(
        60.0, gt=0, description="Lease of a tenant's invoice run (renewed while it runs)"
    )
    invoice_run_wait_s: float = Field(
        600.0, ge=0, description="How long a run waits for another run of the tenant (then 409)"
    )
    invoice_number_prefix: str = Field("INV", pattern=r"^[A-Z0-9][A-Z0-9-]{0,15}$")
    credit_note_number_prefix: str = Field("CN", pattern=r"^[A-Z0-9][A-Z0-9-]{0,15}$")
    billing_tasks: bool = Field(
        True, description="Run the webhook dispatcher and the threshold check in this API process"
    )
    webhook_master_key: str = Field(
        "", description="Derives every endpoint's signing secret; empty = generated in data_dir"
    )
    webhook_max_attempts: int = Field(8, ge=1, le=50)
    webhook_backoff_s: float = Field(
        2.0, gt=0, description="First retry delay; doubles per attempt"
    )
    webhook_backoff_max_s: float = Field(3600.0, gt=0)
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_poll_interval_s: float = Field(0.5, gt=0)
    webhook_lease_s: float = Field(
        30.0, gt=0, description="Lease of the one webhook dispatcher among the API replicas"
    )
    webhook_reconcile_interval_s: float = Field(
        60.0, gt=0, description="How often the dispatcher queues notifications a crash lost"
    )
    webhook_reconcile_lookback: timedelta = Field(
        timedelta(days=3), description="How far back the first reconciliation after a start looks"
    )
    threshold_check_interval_s: float = Field(60.0, gt=0)
    # --- backfill ----------------------------------------------------------------------------
    backfill_chunk_events: int = Field(50_000, ge=1, description="Events per stored chunk")
    backfill_lease_s: float = Field(
        60.0, gt=0, description="A run without a heartbeat for this long is resumable"
    )
    backfill_wait_s: float = Field(
        60.0, gt=0, description="How long a run waits for the worker to pass the meter's markers"
    )

    # --- secrets at rest ---------------------------------------------------------------------
    secrets_key: SecretStr = Field(
        SecretStr(""),
        description="Fernet key(s) sealing stored secrets (Segment webhook secrets), comma-"
        "separated: the first seals, all open (key rotation). Embedded mode: generated once in "
        "<data_dir>/secrets.key when empty. Scale-out: set the same value on every API replica",
    )

    # --- client commands (tally events send, tally doctor) ----------------------------------
    url: str = Field("", description="URL of a running Tally server, e.g. http://127.0.0.1:8000")
    api_key: SecretStr = Field(SecretStr(""), description="Tenant API key for client commands")

    # --- observability (docs/deploy.md) ---------------------------------------------------
    worker_metrics_host: str = Field(
        "127.0.0.1", description="`tally worker`: address of its /metrics, /healthz, /readyz"
    )
    worker_metrics_port: int = Field(
        9464, ge=0, le=65535, description="`tally worker`: port of /metrics etc. (0 = any free)"
    )
    worker_max_lag: int = Field(
        100_000, ge=1, description="/readyz is red when more messages than this wait unstored"
    )
    worker_max_freshness_s: float = Field(
        60.0,
        gt=0,
        description="/readyz is red when the oldest unstored message is older than this "
        "(a stuck or too slow worker)",
    )
    late_event_s: float = Field(
        60.0, ge=0, description="Events older than this at acceptance count as late (metric)"
    )
    metrics_tenant_top_n: int = Field(
        10,
        ge=0,
        le=1000,
        description="tally_tenant_events_total has a series for at most this many tenants "
        "(the busiest; the rest are 'other')",
    )
    metrics_tenants: str = Field(
        "",
        description="Comma-separated tenant ids that get their own series in "
        "tally_tenant_events_total instead of the top N (the rest are 'other')",
    )

    # --- process ---------------------------------------------------------------------------
    gc_threshold: int = Field(
        100_000,
        ge=0,
        description="Python's cyclic garbage collector runs its young generation every this many "
        "net allocations in tally run/api/worker (start-up objects are frozen); 0 keeps "
        "Python's default (700), which makes bulk JSON decoding much slower (tally.gcpause)",
    )
    switch_interval_ms: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Python's thread switch interval in tally run/api/worker: a thread back "
        "from chDB, sqlite or a socket waits at most about this long for the interpreter lock "
        "(Python's default is 5 ms; tally.process)",
    )

    # --- logging -----------------------------------------------------------------------------
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    log_format: LogFormat = Field(
        LogFormat.TEXT, description="text (for a terminal) or json (one object per line)"
    )
    access_log: bool = Field(
        False, description="Log one line per HTTP request (route, status, time, tenant, ids)"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: object) -> object:
        return v.upper() if isinstance(v, str) else v

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.dedupe_horizon < self.max_lateness:
            raise ValueError(
                "dedupe_horizon must be >= max_lateness, otherwise a late retry could be counted twice"
            )
        if self.webhook_lease_s < self.webhook_timeout_s + 10:
            raise ValueError(
                "webhook_lease_s must be >= webhook_timeout_s + 10: the dispatcher starts an "
                "attempt only while its lease covers the attempt's timeout and its bookkeeping"
            )
        return self

    @property
    def embedded(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def effective_ingest_wait(self) -> WaitMode:
        if self.ingest_wait is not None:
            return self.ingest_wait
        return WaitMode.STORED if self.embedded else WaitMode.BROKER

    @property
    def chdb_dir(self) -> Path:
        return self.data_dir / "clickhouse"


def get_settings(**overrides: object) -> Settings:
    """Read settings from the environment, with explicit overrides (used by the CLI and tests)."""
    return Settings(**overrides)  # type: ignore[arg-type]
