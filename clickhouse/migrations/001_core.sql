-- Core tables. {db} is replaced by the configured database name.
-- Every table has tenant_id first in its sorting key, except system-scope tables
-- (schema_migrations, admin_tokens).

CREATE TABLE IF NOT EXISTS {db}.tenants
(
    tenant_id  String,
    name       String,
    created_at DateTime64(3, 'UTC'),
    version    UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY tenant_id;

-- API keys: key = 'tly_' || tenant_id || '_' || secret; only sha256(key) is stored.
CREATE TABLE IF NOT EXISTS {db}.api_keys
(
    tenant_id  String,
    key_hash   String,
    key_prefix String,
    created_at DateTime64(3, 'UTC'),
    revoked    UInt8,
    version    UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, key_hash);

CREATE TABLE IF NOT EXISTS {db}.admin_tokens
(
    token_hash String,
    created_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY token_hash;

CREATE TABLE IF NOT EXISTS {db}.meters
(
    tenant_id  String,
    slug       String,
    meter_id   String,
    spec       String,              -- MeterSpec as JSON
    created_at DateTime64(3, 'UTC'),
    deleted    UInt8,
    version    UInt64               -- epoch ms of the change; highest wins
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, slug);

-- The immutable ledger of deduplicated events. A re-flush after a crash writes identical rows
-- (same key, same partition), which ReplacingMergeTree collapses; readers use FINAL.
CREATE TABLE IF NOT EXISTS {db}.events
(
    tenant_id        String,
    event_id         String,
    event_type       LowCardinality(String),
    customer         String,
    time             DateTime64(3, 'UTC'),
    properties       String,        -- JSON object text
    ingested_at      DateTime64(3, 'UTC'),
    source_topic     LowCardinality(String),
    source_partition Int32,
    source_offset    Int64,
    source_index     UInt32,        -- position of the event inside its envelope
    INDEX idx_source_offset source_offset TYPE minmax GRANULARITY 4,
    INDEX idx_event_type event_type TYPE set(256) GRANULARITY 4,
    INDEX idx_time time TYPE minmax GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ingested_at)
ORDER BY (tenant_id, event_id);

-- Minute pre-aggregates. One INSERT per flush holds the usage rows of the flushed offsets AND one
-- progress row per flushed partition (tenant_id = '', meter_id = '~progress', customer = topic,
-- group_key = partition number, source_offset = last flushed offset). No PARTITION BY: an insert
-- must become a single part so that it is atomic; this insert is the worker's commit point.
-- Rows are deltas that are each inserted exactly once, so any merge of them is correct.
CREATE TABLE IF NOT EXISTS {db}.usage_minute
(
    tenant_id    String,
    meter_id     String,
    customer     String,
    window_start DateTime64(3, 'UTC'),
    group_key    String,            -- canonical JSON of group_values ('' when no group_by)
    origin       LowCardinality(String),  -- 's' = stream, 'b:<run id>' = backfill
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
ORDER BY (tenant_id, meter_id, customer, window_start, group_key, origin);
