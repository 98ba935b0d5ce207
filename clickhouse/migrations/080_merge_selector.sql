-- Wider background merges of the two tables every flush writes to (docs/performance.md, "Wider
-- merges of the hot tables"). The store merges a table's small parts into larger ones, and each
-- merge rewrites every row it reads; with merge_selector_base = 10 (the store's default is 5)
-- it waits for more parts of a similar size and merges them in one go, so a row is rewritten
-- fewer times on its way into a large part, at the price of a few more active parts. Rows and
-- answers are the same either way: merges only combine what the tables' engines combine
-- (usage_minute: delta rows of the same key, summed; events: copies of one event id).
-- ALTER ... MODIFY SETTING is idempotent (a re-run sets the same value).
ALTER TABLE {db}.events MODIFY SETTING merge_selector_base = 10;
ALTER TABLE {db}.usage_minute MODIFY SETTING merge_selector_base = 10;
