-- Redrives (G13): users dead-lettered because retries ran out are re-queued by themselves after
-- retry.redrive_after, at most retry.redrives times. The count is kept per user (a failure's users
-- are re-batched with others after a redrive); it starts again once the user was sent since.
ALTER TABLE {schema}.sync_state ADD COLUMN redrives smallint NOT NULL DEFAULT 0;
ALTER TABLE {schema}.sync_state ADD COLUMN redriven_at timestamptz;
CREATE INDEX failures_exhausted_open ON {schema}.failures (last_failed_at)
    WHERE resolved_at IS NULL AND kind = 'exhausted';
