-- Backfill runs as an atomic swap (docs/architecture.md, "Backfill").

-- The rows of backfill runs (origin = 'b:<run id>'), same columns as usage_minute. A run writes
-- them in chunks; each chunk is ONE insert (one part) holding the chunk's usage rows plus its
-- checkpoint row (meter_id = '~cp:<meter id>'), sent with the insert-deduplication token
-- (run, chunk): a chunk re-sent by a resumed run or after a lost answer is stored once.
-- Usage queries read only the meter's latest COMPLETE run from here.
CREATE TABLE IF NOT EXISTS {db}.usage_backfill
(
    tenant_id    String,
    meter_id     String,
    customer     String,
    window_start DateTime64(3, 'UTC'),
    group_key    String,
    origin       LowCardinality(String),
    group_values SimpleAggregateFunction(any, Map(String, String)),
    events       SimpleAggregateFunction(sum, UInt64),
    value_count  SimpleAggregateFunction(sum, UInt64),
    value_sum    SimpleAggregateFunction(sum, Decimal(38, 9)),
    value_min    SimpleAggregateFunction(min, Nullable(Decimal(38, 9))),
    value_max    SimpleAggregateFunction(max, Nullable(Decimal(38, 9))),
    uniq_values  SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    latest       SimpleAggregateFunction(max, Tuple(Int64, String, Decimal(38, 9))),
    source_offset SimpleAggregateFunction(max, Int64)
)
ENGINE = AggregatingMergeTree
ORDER BY (tenant_id, meter_id, origin, customer, window_start, group_key)
SETTINGS non_replicated_deduplication_window = 10000;

-- One row per state change of a run (highest version wins; 'complete' is final). The run that
-- queries show is the meter's latest row with state = 'complete'.
CREATE TABLE IF NOT EXISTS {db}.backfill_runs
(
    tenant_id      String,
    meter_id       String,
    run_id         String,
    state          LowCardinality(String),   -- running | complete | failed
    owner          String,                   -- the invocation holding the lock
    boundary       String,                   -- JSON, fixed once the watermark was reached
    chunk_events   UInt64,
    events_total   UInt64,
    events_scanned UInt64,
    events_matched UInt64,
    value_problems UInt64,
    windows        UInt64,
    chunks         UInt64,
    error          String,
    started_at     DateTime64(3, 'UTC'),
    heartbeat_at   DateTime64(3, 'UTC'),
    finished_at    DateTime64(3, 'UTC'),
    version        UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, meter_id, run_id);

-- The per-meter lock: a row per acquisition, inserted with the deduplication token
-- (tenant, meter, seq). The store keeps exactly one row per seq; whoever reads back its own
-- owner id won.
CREATE TABLE IF NOT EXISTS {db}.backfill_locks
(
    tenant_id   String,
    meter_id    String,
    seq         UInt64,
    run_id      String,
    owner       String,
    acquired_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY (tenant_id, meter_id, seq)
SETTINGS non_replicated_deduplication_window = 1000;

-- Backfill rows written by earlier versions live in usage_minute with origin 'b:<run>'; register
-- them as complete runs so that queries keep showing them until the meter's next run replaces
-- them. Re-running this inserts identical rows (same key and version), which collapse.
INSERT INTO {db}.backfill_runs (tenant_id, meter_id, run_id, state, owner, boundary, error, started_at, heartbeat_at, finished_at, version)
SELECT tenant_id, meter_id, substring(origin, 3), 'complete', 'legacy', '', '', toDateTime64(0, 3, 'UTC'), toDateTime64(0, 3, 'UTC'), toDateTime64(0, 3, 'UTC'), 0
FROM {db}.usage_minute
WHERE startsWith(origin, 'b:') AND tenant_id != ''
GROUP BY tenant_id, meter_id, origin;
