-- The pipeline (source -> API) this state schema belongs to. sync_state and cursors are not keyed
-- by pipeline, so until several pipelines share a schema (SPEC: planned) the first `run` records
-- its own here and every start compares: a second config on the same schema would take its users.
CREATE TABLE {schema}.pipelines (
    name         text PRIMARY KEY,               -- queue.name
    source       text NOT NULL,                  -- source.table as schema.table
    api          text NOT NULL,                  -- api.url + api.batch_path, without credentials
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
