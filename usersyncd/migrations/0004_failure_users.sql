-- Which failures hold which user, as a btree the planner always uses: `user_ids && $1` with a
-- batch of 1,000 ids scans every failure (seconds at 300,000 of them, GIN index or not), inside
-- the transaction that marks a batch sent.
CREATE TABLE {schema}.failure_users (
    user_id     text NOT NULL,
    failure_id  bigint NOT NULL REFERENCES {schema}.failures (id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, failure_id)
);
CREATE INDEX failure_users_failure ON {schema}.failure_users (failure_id);
INSERT INTO {schema}.failure_users (user_id, failure_id)
SELECT DISTINCT u, f.id FROM {schema}.failures f, unnest(f.user_ids) AS u;
DROP INDEX {schema}.failures_users;  -- the GIN index nothing can use well any more
CREATE INDEX failures_resolved ON {schema}.failures (resolved_at) WHERE resolved_at IS NOT NULL;

-- When the API was last known to hold each user's current state, and how it was known: 'sent'
-- (accepted), 'unchanged' (the row equals what was sent), 'gone' (the row is deleted or filtered
-- out). A failure resolves once each of its users is settled after it failed (G7).
ALTER TABLE {schema}.sync_state ADD COLUMN settled_at timestamptz;
ALTER TABLE {schema}.sync_state ADD COLUMN settled text
    CHECK (settled IN ('sent', 'unchanged', 'gone'));
UPDATE {schema}.sync_state SET settled_at = sent_at, settled = 'sent' WHERE sent_at IS NOT NULL;

-- What the batch's last failed attempt was: 'exhausted' (a transient answer of the API) or
-- 'error' (the batch could not be prepared: G14). A batch reclaimed with every attempt spent is
-- dead-lettered with it, not tried once more.
ALTER TABLE {schema}.batches ADD COLUMN last_kind text;
