-- usersyncd status and the /metrics gauges. {schema} is replaced by the quoted state_schema.

-- counts --
-- The backlog in one statement; each count stops at $1 rows (NULL: exact), so a scrape stays cheap at millions.
SELECT
    (SELECT count(*) FROM (SELECT FROM {schema}.sync_state
                           WHERE dirty AND batch_id IS NULL AND lane = 0 LIMIT $1) AS t) AS live_ready,
    (SELECT count(*) FROM (SELECT FROM {schema}.sync_state
                           WHERE dirty AND batch_id IS NULL AND lane <> 0 LIMIT $1) AS t) AS backfill_ready,
    (SELECT count(*) FROM (SELECT FROM {schema}.sync_state
                           WHERE batch_id IS NOT NULL LIMIT $1) AS t) AS in_batches,
    (SELECT count(*) FROM (SELECT FROM {schema}.batches
                           WHERE status IN ('pending', 'claimed') LIMIT $1) AS t) AS open_batches,
    (SELECT count(*) FROM (SELECT FROM {schema}.failures
                           WHERE resolved_at IS NULL LIMIT $1) AS t) AS open_failures,
    (SELECT count(*) FROM (SELECT FROM {schema}.sync_state
                           WHERE gone AND sent_email IS NOT NULL AND unsubscribed_at IS NULL
                           LIMIT $1) AS t) AS gone,
    (SELECT max(started_at) FROM {schema}.requests WHERE outcome = 'ok') AS last_success;

-- live_ready_estimate --
-- The planner's row estimate for a count that reached its cap (statistics only, no scan).
EXPLAIN (FORMAT JSON) SELECT FROM {schema}.sync_state WHERE dirty AND batch_id IS NULL AND lane = 0;

-- backfill_ready_estimate --
-- As above, the paced lanes (backfill and waves; redriven users, lane 3, wait behind them).
EXPLAIN (FORMAT JSON) SELECT FROM {schema}.sync_state WHERE dirty AND batch_id IS NULL AND lane <> 0;

-- in_batches_estimate --
-- As above, users in open batches.
EXPLAIN (FORMAT JSON) SELECT FROM {schema}.sync_state WHERE batch_id IS NOT NULL;

-- open_batches_estimate --
-- As above, open batches.
EXPLAIN (FORMAT JSON) SELECT FROM {schema}.batches WHERE status IN ('pending', 'claimed');

-- open_failures_estimate --
-- As above, open failures.
EXPLAIN (FORMAT JSON) SELECT FROM {schema}.failures WHERE resolved_at IS NULL;

-- gone_estimate --
-- As above, users the API holds subscribed whose row is deleted or filtered out (G12).
EXPLAIN (FORMAT JSON) SELECT FROM {schema}.sync_state
WHERE gone AND sent_email IS NOT NULL AND unsubscribed_at IS NULL;
