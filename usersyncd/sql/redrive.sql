-- Redrives (usersyncd/redrive.py, G13). {schema} is the quoted state schema.

-- redrive --
-- Re-queue the users of open `exhausted` failures older than $1 seconds whose redrives ($2 at
-- most; a user sent since its last redrive starts again at 0) are not used up, at most $3 failures
-- a pass. The users wait in lane 3, behind live and backfill users. A failure ends as 'redriven'
-- when all its users went back to the queue; users whose redrives are used up stay in it (an
-- operator's, then), and only they.
WITH due AS (
    SELECT f.id, f.user_ids FROM {schema}.failures f
    WHERE f.resolved_at IS NULL AND f.kind = 'exhausted'
      AND f.last_failed_at < clock_timestamp() - make_interval(secs => $1)
      AND (f.replayed_at IS NULL OR f.replay_outcome IS NOT NULL)  -- not while an operator replays it
      AND EXISTS (
          SELECT 1 FROM unnest(f.user_ids) AS u(user_id)
          JOIN {schema}.sync_state s ON s.user_id = u.user_id
          WHERE CASE WHEN s.sent_at > s.redriven_at THEN 0 ELSE s.redrives END < $2
      )
    ORDER BY f.last_failed_at, f.id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
), candidates AS (
    SELECT s.user_id FROM {schema}.sync_state s
    WHERE s.user_id IN (SELECT unnest(user_ids) FROM due)
      AND CASE WHEN s.sent_at > s.redriven_at THEN 0 ELSE s.redrives END < $2
    ORDER BY s.user_id  -- every writer of sync_state locks rows in user_id order
    FOR UPDATE
), requeued AS (
    UPDATE {schema}.sync_state s
    SET dirty = true,
        lane = CASE WHEN s.dirty THEN least(s.lane, 3) ELSE 3 END,
        dirty_since = CASE WHEN s.dirty THEN s.dirty_since ELSE clock_timestamp() END,
        stage_seq = s.stage_seq + 1,
        redrives = CASE WHEN s.sent_at > s.redriven_at THEN 0 ELSE s.redrives END + 1,
        redriven_at = clock_timestamp()
    FROM candidates c
    WHERE s.user_id = c.user_id
    RETURNING s.user_id, s.redrives
), kept AS (
    SELECT due.id, ARRAY(
        SELECT u FROM unnest(due.user_ids) AS u WHERE u NOT IN (SELECT user_id FROM requeued) ORDER BY u
    ) AS user_ids
    FROM due
), ended AS (
    UPDATE {schema}.failures f
    SET user_ids = CASE WHEN cardinality(kept.user_ids) > 0 THEN kept.user_ids ELSE f.user_ids END,
        resolved_at = CASE WHEN cardinality(kept.user_ids) = 0 THEN clock_timestamp() END,
        resolution = CASE WHEN cardinality(kept.user_ids) = 0 THEN 'redriven' END
    FROM kept WHERE f.id = kept.id
    RETURNING f.id
), unindexed AS (  -- users that left a failure leave its index too
    DELETE FROM {schema}.failure_users fu
    USING kept
    WHERE fu.failure_id = kept.id AND cardinality(kept.user_ids) > 0 AND fu.user_id <> ALL(kept.user_ids)
)
SELECT (SELECT count(*) FROM ended) AS failures,
       (SELECT count(*) FROM requeued) AS users,
       (SELECT coalesce(max(redrives), 0) FROM requeued) AS most;

-- redrive_counts --
-- For open failures ($1 ids): how often their users were redriven (the most among them), for `failed`.
SELECT f.id, coalesce(max(CASE WHEN s.sent_at > s.redriven_at THEN 0 ELSE s.redrives END), 0) AS redrives
FROM {schema}.failures f
LEFT JOIN {schema}.sync_state s ON s.user_id = ANY(f.user_ids)
WHERE f.id = ANY($1::bigint[])
GROUP BY f.id;
