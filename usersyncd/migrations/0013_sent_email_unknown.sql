-- Users the API accepted before sync_state kept their email (migration 0010): sent_hash set,
-- sent_email NULL. The start-up recovery (usersyncd/recover.py) walks them by this index and
-- fills sent_email (and sent_tags) where the row still hashes to sent_hash; the others leave it
-- at their next accepted send. Few, and fewer with every send: a small partial index.
CREATE INDEX sync_state_sent_email_unknown ON {schema}.sync_state (user_id)
    WHERE sent_hash IS NOT NULL AND sent_email IS NULL;
