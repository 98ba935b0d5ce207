-- Day rows (clickhouse/rollup.py, docs/architecture.md "Day rows"): every stream row of
-- usage_minute also stored under meter_id 'd:<meter id>' with window_start floored to its UTC
-- day, so that a usage query reads whole days without their minutes. From this version on the
-- worker writes them in the same insert as the minute rows (its commit point); this migration
-- writes those of the minute rows stored before it.
--
-- Safe to run again after it failed half way: it first deletes every day row, then writes them
-- all from the minute rows, never deduplicated (blocks equal to the deleted ones would be
-- dropped by the table's deduplication log otherwise). Run it while no worker commits (workers
-- of earlier versions write no day rows, workers of this one would have theirs counted twice
-- if they commit between the two statements): `tally migrate` with the workers stopped, or the
-- first start of `tally run` / `tally worker`, which migrates before it consumes
-- (docs/operations.md, "Upgrading to day rows").
DELETE FROM {db}.usage_minute WHERE startsWith(meter_id, 'd:') SETTINGS mutations_sync = 2;
INSERT INTO {db}.usage_minute (tenant_id, meter_id, customer, window_start, group_key, origin, group_values, events, value_count, value_sum, value_min, value_max, uniq_values, latest, source_offset) SELECT tenant_id, concat('d:', meter_id), customer, toStartOfDay(window_start), group_key, origin, group_values, events, value_count, value_sum, value_min, value_max, uniq_values, latest, source_offset FROM {db}.usage_minute WHERE origin = 's' AND tenant_id != '' AND NOT startsWith(meter_id, 'd:') SETTINGS insert_deduplicate = 0;
