-- A pause for a configuration the API refuses (404, or the same whole-batch refusal for single
-- records in a row: SPEC §2): held like a credentials pause until a probe works.
ALTER TABLE {schema}.pauses DROP CONSTRAINT IF EXISTS pauses_reason_check;
ALTER TABLE {schema}.pauses ADD CONSTRAINT pauses_reason_check
    CHECK (reason IN ('rate_limited', 'credentials', 'configuration'));
-- the isolation budget (limits.isolate_share) counts the ledger's 'isolate' starts within a span
CREATE INDEX requests_isolate ON {schema}.requests (started_at) WHERE kind = 'isolate';
