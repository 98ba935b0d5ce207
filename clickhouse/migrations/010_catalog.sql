-- Catalog: plan versions, customers, subscriptions (clickhouse/catalog.py, docs/catalog.md).
-- Every table is tenant-scoped (tenant_id first in the key) and read with FINAL.
-- The full object is kept as JSON in `doc`; a few columns are copied out for filtering.

-- Published plan versions are immutable: one row per (tenant_id, code, version), written once.
-- `rank` = 2^63 - epoch microseconds of the write: if two writers race for the same version,
-- the FIRST write keeps winning (ReplacingMergeTree keeps the highest rank), so a version that
-- a caller saw published is never replaced later.
CREATE TABLE IF NOT EXISTS {db}.plans
(
    tenant_id  String,
    code       String,
    version    UInt32,
    name       String,
    currency   LowCardinality(String),
    doc        String,
    created_at DateTime64(3, 'UTC'),
    rank       UInt64
)
ENGINE = ReplacingMergeTree(rank)
ORDER BY (tenant_id, code, version);

-- Customers: the latest revision wins (`version` = strictly increasing epoch ms of the change).
CREATE TABLE IF NOT EXISTS {db}.customers
(
    tenant_id   String,
    external_id String,
    name        String,
    currency    LowCardinality(String),
    doc         String,
    created_at  DateTime64(3, 'UTC'),
    updated_at  DateTime64(3, 'UTC'),
    version     UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, external_id);

-- Subscriptions: the current state and the full transition history (in `doc`); the latest
-- revision wins. The pinned plan version of every past state is in the history.
CREATE TABLE IF NOT EXISTS {db}.subscriptions
(
    tenant_id       String,
    subscription_id String,
    customer_id     String,
    status          LowCardinality(String),
    plan_code       String,
    plan_version    UInt32,
    doc             String,
    created_at      DateTime64(3, 'UTC'),
    updated_at      DateTime64(3, 'UTC'),
    version         UInt64,
    INDEX idx_customer customer_id TYPE bloom_filter GRANULARITY 4
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, subscription_id);
