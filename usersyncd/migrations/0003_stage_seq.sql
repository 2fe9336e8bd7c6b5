-- Whether a user needs another sync is decided by a counter bumped at each staging, not by
-- comparing timestamps: an updated_at can move backwards (clock skew between application
-- servers, a trigger stamping now() in a transaction that commits late).
ALTER TABLE {schema}.sync_state ADD COLUMN stage_seq bigint NOT NULL DEFAULT 0;
