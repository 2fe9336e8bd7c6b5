-- Which pipeline owns the state schema. {schema} is the quoted state schema.

-- lock --
-- Two first starts at once: one records, the other then sees the record (held to the transaction's end).
LOCK TABLE {schema}.pipelines IN SHARE ROW EXCLUSIVE MODE;

-- recorded --
-- The pipelines recorded so far (one, until several pipelines a schema are supported).
SELECT name, source, api FROM {schema}.pipelines ORDER BY recorded_at, name;

-- record --
-- This pipeline owns the schema from now on.
INSERT INTO {schema}.pipelines (name, source, api) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING;
