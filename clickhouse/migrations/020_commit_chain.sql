-- The worker's commit chain (docs/architecture.md, "The worker's commit protocol").
--
-- usage_minute keeps a deduplication log of its last 100000 inserted blocks: an INSERT that
-- carries an insert_deduplication_token already in the log is a silent no-op. Every commit of
-- the worker is one INSERT (one block) whose token names the start of the offsets it covers
-- ("<topic>/<partition>/<first offset>"), so two writers extending the chain from the same point
-- (a retry whose answer was lost, an insert landing after its client gave up, a zombie worker and
-- the new owner) store exactly one link. 100000 blocks last ~40 min at 40 commits/s (8
-- partitions flushed 5 times a second, far above normal load) and hours at normal load; a retry
-- or a late insert must land within that window, which the worker bounds (link_max_age_s) far
-- below it. The log is on disk and survives restarts.
ALTER TABLE {db}.usage_minute MODIFY SETTING non_replicated_deduplication_window = 100000;

-- Partition claims: a worker writes one on every assignment (epoch = wall ms, strictly above the
-- newest claim it saw). A worker that sees a newer claim of another owner for a partition stops
-- committing it (fencing). System scope (no tenant), like the progress rows.
CREATE TABLE IF NOT EXISTS {db}.worker_claims
(
    topic      String,
    partition  Int32,
    epoch      UInt64,
    owner      String,
    claimed_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(epoch)
ORDER BY (topic, partition);

-- Worker heartbeats, written every few seconds by every worker (scale-out /readyz reads them).
-- System scope (no tenant). One row per worker instance after merges; old instances expire.
CREATE TABLE IF NOT EXISTS {db}.worker_heartbeats
(
    worker_id       String,
    topic           String,
    beat_at         DateTime64(3, 'UTC'),
    started_at      DateTime64(3, 'UTC'),
    state           LowCardinality(String),   -- starting | running | stopped
    last_commit_at  Nullable(DateTime64(3, 'UTC')),
    failing_since   Nullable(DateTime64(3, 'UTC')),
    last_error      String,
    partitions      Array(Int32)
)
ENGINE = ReplacingMergeTree(beat_at)
ORDER BY worker_id
TTL toDateTime(beat_at) + INTERVAL 1 DAY;
