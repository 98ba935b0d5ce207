-- Billing: invoices, document numbers, credit notes, discounts, audit trail, event corrections,
-- webhooks and usage thresholds (billing/, clickhouse/billing.py, docs/invoicing.md).
-- Every table is tenant-scoped (tenant_id first in the key). ClickHouse has no transactions:
-- ids are deterministic, rows are versioned (ReplacingMergeTree, read with FINAL) and the tables
-- that arbitrate races keep insert deduplication tokens (non_replicated_deduplication_window),
-- so that of two identical claims only the first is ever stored.

-- One row per invoice (latest version wins). invoice_id = hash(tenant, subscription, period,
-- revision): two runs closing the same period write the same key, so there is one invoice.
CREATE TABLE IF NOT EXISTS {db}.invoices
(
    tenant_id       String,
    invoice_id      String,
    subscription_id String,
    customer_id     String,
    period_start    DateTime64(3, 'UTC'),
    period_end      DateTime64(3, 'UTC'),
    revision        UInt32,
    status          LowCardinality(String),
    number          String,
    doc             String,
    created_at      DateTime64(3, 'UTC'),
    updated_at      DateTime64(3, 'UTC'),
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, invoice_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Gapless numbering: a number is claimed by inserting (tenant, kind, seq) with the insert
-- deduplication token 'tenant/kind/seq'; a second claim of the same seq is dropped by the
-- server, and `rank` (2^63 - insert time) keeps the first claim should a token ever have left
-- the window. The claim carries the finalized document: it is the commit point of a
-- finalization (or of a credit note).
CREATE TABLE IF NOT EXISTS {db}.document_numbers
(
    tenant_id   String,
    kind        LowCardinality(String),
    seq         UInt64,
    document_id String,
    doc         String,
    claimed_at  DateTime64(3, 'UTC'),
    rank        UInt64
)
ENGINE = ReplacingMergeTree(rank)
ORDER BY (tenant_id, kind, seq)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.credit_notes
(
    tenant_id      String,
    credit_note_id String,
    invoice_id     String,
    customer_id    String,
    number         String,
    doc            String,
    created_at     DateTime64(3, 'UTC'),
    version        UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, credit_note_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.discounts
(
    tenant_id   String,
    customer_id String,
    discount_id String,
    doc         String,
    created_at  DateTime64(3, 'UTC'),
    version     UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, customer_id, discount_id);

-- Append-only audit trail: every state change of plans, subscriptions, invoices, credit notes,
-- corrections, with actor and time.
CREATE TABLE IF NOT EXISTS {db}.audit_log
(
    tenant_id   String,
    object_type LowCardinality(String),
    object_id   String,
    at          DateTime64(3, 'UTC'),
    action      LowCardinality(String),
    actor       String,
    data        String
)
ENGINE = MergeTree
ORDER BY (tenant_id, object_type, object_id, at);

-- Append-only event corrections (void / amend by event id), never an edit of `events`.
CREATE TABLE IF NOT EXISTS {db}.event_corrections
(
    tenant_id     String,
    event_id      String,
    correction_id String,
    action        LowCardinality(String),
    doc           String,
    created_at    DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant_id, event_id, correction_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Signed per-minute deltas of the corrections, for additive meters (count, sum): usage queries
-- add them to the pre-aggregates (clickhouse.queries.corrections_sql). Keyed by correction id,
-- so a retried insert collapses.
CREATE TABLE IF NOT EXISTS {db}.usage_corrections
(
    tenant_id     String,
    meter_id      String,
    customer      String,
    window_start  DateTime64(3, 'UTC'),
    group_key     String,
    correction_id String,
    group_values  Map(String, String),
    events        Int64,
    value_sum     Decimal(38, 9)
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant_id, meter_id, customer, window_start, group_key, correction_id);

-- Webhook endpoints. The signing secret is NOT stored: it is derived from the server's
-- webhook master key, the endpoint id and `secret_version` (see docs/invoicing.md).
CREATE TABLE IF NOT EXISTS {db}.webhook_endpoints
(
    tenant_id      String,
    endpoint_id    String,
    doc            String,
    secret_version UInt32,
    disabled       UInt8,
    created_at     DateTime64(3, 'UTC'),
    version        UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, endpoint_id);

-- The outbox: one row per (endpoint, event), delivery_id deterministic; state versions.
CREATE TABLE IF NOT EXISTS {db}.webhook_deliveries
(
    tenant_id       String,
    delivery_id     String,
    endpoint_id     String,
    event_id        String,
    event_type      LowCardinality(String),
    status          LowCardinality(String),
    next_attempt_at DateTime64(3, 'UTC'),
    doc             String,
    created_at      DateTime64(3, 'UTC'),
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, delivery_id);

CREATE TABLE IF NOT EXISTS {db}.webhook_attempts
(
    tenant_id   String,
    delivery_id String,
    attempt     UInt32,
    at          DateTime64(3, 'UTC'),
    status_code Int32,
    error       String,
    duration_ms UInt32
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant_id, delivery_id, attempt);

CREATE TABLE IF NOT EXISTS {db}.usage_thresholds
(
    tenant_id    String,
    customer_id  String,
    threshold_id String,
    meter_slug   String,
    doc          String,
    created_at   DateTime64(3, 'UTC'),
    version      UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (tenant_id, customer_id, threshold_id);
