-- Exact event corrections for every aggregation, corrections vs. backfill runs, and leases
-- (docs/invoicing.md "Corrections", docs/architecture.md "Corrections and the stream/backfill
-- boundary"). Tenant first in every key, except `leases` rows of system-wide leases
-- (tenant_id = '': the webhook dispatcher).

-- The correction log. A correction is ONE insert (one part: all or nothing) holding its record
-- row (meter_id = '': the Correction document) and one effect row per (meter, group, side) it
-- changes, sent with the insert-deduplication token (tenant, seq): of two corrections that claim
-- the same seq only the first is stored, so seqs are a gapless per-tenant order of corrections.
-- Effect rows: signed deltas (events, value_count, value_sum) of the event's contribution, for
-- the side that counted it: 's' = the stream (position after the meter's activation marker),
-- 'b' = the backfill side (before it; counted by backfill runs). For count/sum/avg meters usage
-- queries add them; for min/max/unique_count/latest they mark the minute window "dirty" (see
-- usage_overrides).
CREATE TABLE IF NOT EXISTS {db}.corrections
(
    tenant_id     String,
    seq           UInt64,
    correction_id String,
    event_id      String,
    meter_id      String,
    customer      String,
    window_start  DateTime64(3, 'UTC'),
    group_key     String,
    side          LowCardinality(String),
    group_values  Map(String, String),
    events        Int64,
    value_count   Int64,
    value_sum     Decimal(38, 9),
    action        LowCardinality(String),
    properties    String,
    doc           String,
    created_at    DateTime64(3, 'UTC'),
    rank          UInt64
)
ENGINE = ReplacingMergeTree(rank)
ORDER BY (tenant_id, meter_id, customer, window_start, group_key, side, seq, correction_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Minute windows of min/max/unique_count/latest meters recomputed from the ledger with every
-- correction applied (seq <= `seq`), per side. Usage queries use a window's override in place of
-- its pre-aggregated rows: always for side 's' (the stream), for side 'b' only when `seq` is
-- newer than the corrections the visible backfill run applied itself. `base_events`: the
-- stream's pre-aggregated event count of the key when the override was computed; a different
-- count now means late events arrived since, and the override is recomputed before it is used.
-- Newest (seq, base_events) wins (version = seq * 2^32 + base_events).
CREATE TABLE IF NOT EXISTS {db}.usage_overrides
(
    tenant_id    String,
    meter_id     String,
    customer     String,
    window_start DateTime64(3, 'UTC'),
    group_key    String,
    side         LowCardinality(String),
    seq          UInt64,
    base_events  UInt64,
    version      UInt64,
    group_values Map(String, String),
    events       UInt64,
    value_count  UInt64,
    value_sum    Decimal(38, 9),
    value_min    Nullable(Decimal(38, 9)),
    value_max    Nullable(Decimal(38, 9)),
    uniq_values  Array(String),
    latest       Tuple(Int64, String, Decimal(38, 9)),
    computed_at  DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, meter_id, customer, window_start, group_key, side);

-- A backfill run applies the corrections with 1 <= seq <= corrections_seq in its scan (read
-- when its boundary is fixed); later corrections reach it through their 'b' effect rows.
ALTER TABLE {db}.backfill_runs ADD COLUMN IF NOT EXISTS corrections_seq UInt64 DEFAULT 0;

-- Leases (the invoice run of a tenant, the webhook dispatcher): a holder acquires seq k by
-- inserting row k with the deduplication token (tenant, name, k) and reading it back; it renews
-- by inserting row k again with a later expiry and a higher version.
CREATE TABLE IF NOT EXISTS {db}.leases
(
    tenant_id   String,
    name        LowCardinality(String),
    seq         UInt64,
    owner       String,
    acquired_at DateTime64(3, 'UTC'),
    expires_at  DateTime64(3, 'UTC'),
    version     UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, name, seq)
SETTINGS non_replicated_deduplication_window = 10000;

-- Corrections recorded by 050 (event_corrections + usage_corrections) join the log with seq 0:
-- their deltas keep their old effect (side 's'); backfill scans apply only seq >= 1.
INSERT INTO {db}.corrections (tenant_id, seq, correction_id, event_id, meter_id, customer, window_start, group_key, side, group_values, events, value_count, value_sum, action, properties, doc, created_at, rank)
SELECT tenant_id, 0, correction_id, event_id, '', JSONExtractString(doc, 'customer'), toStartOfMinute(parseDateTime64BestEffortOrZero(JSONExtractString(doc, 'event_time'), 3, 'UTC')), '', '', map(), 0, 0, toDecimal128(0, 9), action, if(action = 'void', '', JSONExtractRaw(doc, 'properties_after')), doc, created_at, 0
FROM {db}.event_corrections FINAL;

INSERT INTO {db}.corrections (tenant_id, seq, correction_id, event_id, meter_id, customer, window_start, group_key, side, group_values, events, value_count, value_sum, action, properties, doc, created_at, rank)
SELECT tenant_id, 0, correction_id, '', meter_id, customer, window_start, group_key, 's', group_values, events, 0, value_sum, '', '', '', window_start, 0
FROM {db}.usage_corrections FINAL;
