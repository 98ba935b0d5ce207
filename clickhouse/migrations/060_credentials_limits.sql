-- Issue 11: named, expiring, revocable API keys; revocable admin tokens; per-tenant limits and
-- the monthly accepted-event counts. Rows of api_keys and admin_tokens stay immutable after they
-- are created; everything that changes later lives in append-only aggregate tables whose merge
-- functions commute (revocation is sticky, expiry only shortens, last use only grows), so two API
-- processes changing the same key at once can never undo each other.

-- key_id: the public id of a key (first 16 hex chars of sha256(key)); shown in lists.
ALTER TABLE {db}.api_keys ADD COLUMN IF NOT EXISTS key_id String DEFAULT substring(key_hash, 1, 16);
ALTER TABLE {db}.api_keys ADD COLUMN IF NOT EXISTS name String DEFAULT '';
ALTER TABLE {db}.api_keys ADD COLUMN IF NOT EXISTS expires_at Nullable(DateTime64(3, 'UTC'));

-- What happened to a key after it was created. 'never' is 2299-12-31 for the min columns and
-- 1970-01-01 for last_used_at. Effective expiry = min(api_keys.expires_at, expires_at here).
CREATE TABLE IF NOT EXISTS {db}.api_key_state
(
    tenant_id    String,
    key_id       String,
    revoked_at   SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    expires_at   SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_used_at SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
ORDER BY (tenant_id, key_id);

ALTER TABLE {db}.admin_tokens ADD COLUMN IF NOT EXISTS token_id String DEFAULT substring(token_hash, 1, 16);
ALTER TABLE {db}.admin_tokens ADD COLUMN IF NOT EXISTS name String DEFAULT '';

CREATE TABLE IF NOT EXISTS {db}.admin_token_revocations
(
    token_id   String,
    revoked_at SimpleAggregateFunction(min, DateTime64(3, 'UTC'))
)
ENGINE = AggregatingMergeTree
ORDER BY token_id;

-- Per-tenant overrides of the limit defaults (settings). NULL = use the default, 0 = unlimited.
CREATE TABLE IF NOT EXISTS {db}.tenant_limits
(
    tenant_id           String,
    requests_per_second Nullable(Float64),
    events_per_second   Nullable(Float64),
    max_batch_events    Nullable(UInt32),
    monthly_events      Nullable(UInt64),
    updated_at          DateTime64(3, 'UTC'),
    version             UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY tenant_id;

-- Accepted events per tenant and UTC month: deltas flushed by every API process.
CREATE TABLE IF NOT EXISTS {db}.tenant_monthly_events
(
    tenant_id String,
    month     Date,
    events    SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
ORDER BY (tenant_id, month);
