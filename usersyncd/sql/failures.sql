-- Operator commands on the dead letters and the request log. {schema} is the quoted state schema.

-- list_open --
-- Every open failure, oldest first.
SELECT id, kind, user_ids, field, error, http_status, attempts, request_id, batch_id,
       first_failed_at, last_failed_at, replayed_at, replay_outcome
FROM {schema}.failures
WHERE resolved_at IS NULL
ORDER BY id;

-- forget --
-- An operator has dealt with these failures: drop them.
DELETE FROM {schema}.failures WHERE id = ANY($1::bigint[]) RETURNING id;

-- replay_candidates --
-- What a replay would take ($1 ids or NULL, $2 failed since or NULL, $3 all): open, not being replayed.
SELECT id, user_ids FROM {schema}.failures
WHERE resolved_at IS NULL AND (replayed_at IS NULL OR replay_outcome IS NOT NULL)
  AND (id = ANY($1::bigint[]) OR ($2::timestamptz IS NOT NULL AND last_failed_at >= $2) OR $3)
ORDER BY id;

-- claim_for_replay --
-- Take the chosen failures for replay; a failure being replayed (no outcome yet) is not taken
-- twice, so two replays at once re-queue each user once.
UPDATE {schema}.failures
SET replayed_at = clock_timestamp(), replay_outcome = NULL
WHERE id IN (
    SELECT id FROM {schema}.failures
    WHERE resolved_at IS NULL AND (replayed_at IS NULL OR replay_outcome IS NOT NULL)
      AND (id = ANY($1::bigint[]) OR ($2::timestamptz IS NOT NULL AND last_failed_at >= $2) OR $3)
    FOR UPDATE SKIP LOCKED
)
RETURNING id, user_ids;

-- requeue_users --
-- The users wait again, in the live lane (replays go first), to be read and sent as they are now.
INSERT INTO {schema}.sync_state AS s (user_id, seen_updated_at, dirty, lane, stage_seq)
SELECT u, '-infinity', true, 0, 1 FROM unnest($1::text[]) AS u
ORDER BY u  -- user_id order, as every writer of sync_state
ON CONFLICT (user_id) DO UPDATE
SET dirty = true, lane = 0, dirty_since = clock_timestamp(), sent_hash = NULL,
    stage_seq = s.stage_seq + 1;

-- history --
-- The request log, newest first ($1 since or NULL, $2 at most this many rows), with the action
-- of its batch (subscribe or unsubscribe; NULL once the batch is pruned).
SELECT r.id, r.started_at, r.kind, r.batch_id, r.attempt, r.users, r.status, r.outcome, r.duration_ms,
       r.request_id, r.response_request_id, r.error, b.action
FROM {schema}.requests r
LEFT JOIN {schema}.batches b ON b.id = r.batch_id
WHERE r.kind <> 'external' AND ($1::timestamptz IS NULL OR r.started_at >= $1)
ORDER BY r.started_at DESC
LIMIT $2;
