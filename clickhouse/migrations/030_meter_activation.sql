-- Meter activation by markers in the events log (docs/architecture.md, "Meter activation").
-- status: 'pending' until the API had every partition's marker acknowledged, then 'active'.
-- activation_topic: the events topic that carries the meter's markers ('' = a meter stored
-- without markers, by older versions: it applies to every event).
ALTER TABLE {db}.meters ADD COLUMN IF NOT EXISTS status LowCardinality(String) DEFAULT 'active';
ALTER TABLE {db}.meters ADD COLUMN IF NOT EXISTS activation_topic String DEFAULT '';

-- One row per (meter, topic, partition): the offset of the first activation marker the worker
-- processed there. Written by the worker in the flush that holds the marker, before that flush's
-- commit point; the content is deterministic, so a replayed flush writes the same row again.
-- Readers take min(marker_offset) per partition.
CREATE TABLE IF NOT EXISTS {db}.meter_activations
(
    tenant_id        String,
    meter_id         String,
    topic            String,
    source_partition Int32,
    marker_offset    Int64
)
ENGINE = ReplacingMergeTree
ORDER BY (tenant_id, meter_id, topic, source_partition, marker_offset);
