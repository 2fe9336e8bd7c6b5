-- Deletions and rows leaving the filter (SPEC G12, source.on_delete).
-- sync_state.gone: the user's row was last found deleted or failing source.filter (set by the
-- poller, the reconciliation pass and the former; cleared when the row is read again). A ready
-- user that is gone is sent in an unsubscribe batch (on_delete = "unsubscribe"); `status` counts
-- the gone users the API still holds. unsubscribed_at: the API accepted the user's unsubscribe
-- (a user whose row comes back is sent with "status": "active"; a subscribe accepted clears it).
ALTER TABLE {schema}.sync_state ADD COLUMN gone boolean NOT NULL DEFAULT false;
ALTER TABLE {schema}.sync_state ADD COLUMN unsubscribed_at timestamptz;
-- the gone users the API still holds, for status (few; a partial index keeps the count cheap)
CREATE INDEX sync_state_gone_held ON {schema}.sync_state (user_id)
    WHERE gone AND sent_email IS NOT NULL AND unsubscribed_at IS NULL;
-- the ready gone users in the order batches take them: an unsubscribe batch forms from a few
-- among a backlog of millions without a scan
CREATE INDEX sync_state_gone_ready ON {schema}.sync_state (lane, dirty_since, user_id)
    WHERE dirty AND batch_id IS NULL AND gone;
-- A batch is either a subscribe batch (api.batch_path) or an unsubscribe batch (api.unsubscribe_path).
ALTER TABLE {schema}.batches ADD COLUMN action text NOT NULL DEFAULT 'subscribe'
    CHECK (action IN ('subscribe', 'unsubscribe'));
-- The reconciliation pass (source.reconcile_every): one row, shared by replicas (a chunk is done
-- by whoever holds the row's lock). after_id: the pass under way has checked sync_state up to
-- this user (NULL: the next chunk starts from the first); last_*: the last whole pass (the first
-- pass is due reconcile_every after this migration).
CREATE TABLE {schema}.reconcile (
    one             boolean PRIMARY KEY DEFAULT true CHECK (one),
    after_id        text,
    pass_started_at timestamptz,
    pass_checked    bigint NOT NULL DEFAULT 0,
    pass_found      bigint NOT NULL DEFAULT 0,
    last_pass_at    timestamptz,
    last_pass_seconds double precision,
    last_pass_checked bigint,
    last_pass_found bigint
);
INSERT INTO {schema}.reconcile (last_pass_at) VALUES (clock_timestamp());  -- the first pass: reconcile_every from now
