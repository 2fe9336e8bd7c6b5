-- When each slot was granted. `started_at` moves to the request's real start and then to its
-- answer (the API counts arrivals); backfill is paced on the grants, so that time spent sending
-- does not slow the pace.
ALTER TABLE {schema}.requests ADD COLUMN granted_at timestamptz NOT NULL DEFAULT clock_timestamp();
