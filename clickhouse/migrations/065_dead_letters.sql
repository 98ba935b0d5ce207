-- Dead letters (docs/operations.md, "Dead letters"): messages and events of the events topic the
-- worker cannot use. Written by the worker in the flush that holds them, before that flush's
-- commit point, keyed by source position (dead_letter_id is a hash of topic, partition, offset,
-- index and meter), so a replayed flush writes the same row again and the table collapses it.
-- tenant_id is '' when the message names no readable tenant. payload: the raw message (or the
-- one-event envelope of a bad event), at most dead_letter_max_payload_bytes (payload_bytes: the
-- full size; payload_truncated = 1 when cut). produced_at_ms: the broker timestamp, -1 unknown.
CREATE TABLE IF NOT EXISTS {db}.dead_letters
(
    tenant_id         String,
    dead_letter_id    String,
    reason            LowCardinality(String),
    message           String,
    source_topic      String,
    source_partition  Int32,
    source_offset     Int64,
    source_index      Int32,
    event_id          String,
    meter_id          String,
    payload           String,
    payload_bytes     UInt32,
    payload_truncated UInt8,
    produced_at_ms    Int64
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant_id, dead_letter_id);

-- Every re-drive of a dead letter (append-only): when, by whom, where it went.
CREATE TABLE IF NOT EXISTS {db}.dead_letter_redrives
(
    tenant_id      String,
    dead_letter_id String,
    redriven_at    DateTime64(3, 'UTC'),
    actor          String,
    target_topic   String,
    messages       UInt32,
    events         UInt32
)
ENGINE = MergeTree
ORDER BY (tenant_id, dead_letter_id, redriven_at);
