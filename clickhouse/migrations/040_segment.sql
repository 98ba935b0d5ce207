-- Segment sources, one row per tenant (issue 9). Read with FINAL; a change is a new row with a
-- higher version. The webhook shared secrets are sealed (Fernet: AES-128-CBC + HMAC-SHA256)
-- with the server's secrets key before they reach this table; '' = not set.
CREATE TABLE IF NOT EXISTS {db}.segment_settings
(
    tenant_id          String,
    customer_property  String,            -- '' = userId, else anonymousId
    fallback_to_user   UInt8,             -- property missing: use userId/anonymousId (1) or reject (0)
    secret_sealed      String,            -- the current webhook secret, sealed
    secret_set_at      DateTime64(3, 'UTC'),
    previous_sealed    String,            -- the secret before the last rotation, sealed
    previous_until     DateTime64(3, 'UTC'),  -- the previous secret verifies until then
    version            UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY tenant_id;
