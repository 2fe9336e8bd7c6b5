-- The poller's cursors. {schema} is the quoted state schema.

-- init_cursors --
-- First start: live from now ($1), backfill from $2 (NULL: none) up to now; later starts keep theirs.
WITH created AS (
    INSERT INTO {schema}.cursors (lane, updated_at, last_id, until_at, done)
    VALUES ('live', $1, NULL, NULL, false),
           ('backfill', coalesce($2, $1), NULL, $1, $3)
    ON CONFLICT (lane) DO NOTHING
    RETURNING 1
)
SELECT count(*) > 0 FROM created;

-- cursor --
-- One lane's position.
SELECT lane, updated_at, last_id, until_at, done FROM {schema}.cursors WHERE lane = $1;

-- reread_from --
-- Where the next lookback re-read starts, before its lookback is taken off: when the last whole
-- re-read began, or, before any, the live cursor.
SELECT coalesce(reread_at, updated_at) FROM {schema}.cursors WHERE lane = 'live';

-- reread_done --
-- A whole re-read that began at $1 is done: rows committed before then were all seen.
UPDATE {schema}.cursors SET reread_at = $1
WHERE lane = 'live' AND (reread_at IS NULL OR reread_at < $1);

-- cursors --
-- Both lanes, for logs and status.
SELECT lane, updated_at, last_id, until_at, done FROM {schema}.cursors ORDER BY lane;

-- advance_live --
-- The live cursor moves forward only, and never past the database clock (a poll that only
-- re-read the lookback writes nothing).
UPDATE {schema}.cursors
SET updated_at = least($1::timestamptz, clock_timestamp()), changed_at = clock_timestamp()
WHERE lane = 'live' AND updated_at < least($1::timestamptz, clock_timestamp());

-- advance_backfill --
-- The backfill cursor moves to the last key staged; done when the walk reached the first start.
UPDATE {schema}.cursors
SET updated_at = $1, last_id = $2, done = $3, changed_at = clock_timestamp()
WHERE lane = 'backfill';

-- backfill_waiting --
-- Users of the paced lane (backfill, waves) staged and not yet taken into a batch (counted
-- up to the lookahead $1).
SELECT count(*) FROM (
    SELECT 1 FROM {schema}.sync_state WHERE dirty AND batch_id IS NULL AND lane = 1 LIMIT $1
) AS waiting;

-- first_start --
-- The boundary between the lanes: rows older than the first start are the backfill's.
SELECT until_at FROM {schema}.cursors WHERE lane = 'backfill';

-- wave_waiting --
-- Of the paced lane's waiting users, those staged for a change since the first start (waves),
-- not by the backfill: for status. Counted up to $1 rows (NULL: exact), like status's counts.
SELECT count(*) FROM (
    SELECT FROM {schema}.sync_state
    WHERE dirty AND batch_id IS NULL AND lane = 1
      AND seen_updated_at >= (SELECT until_at FROM {schema}.cursors WHERE lane = 'backfill')
    LIMIT $1
) AS waves;
