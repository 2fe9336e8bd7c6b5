-- usersyncd's own state. {schema} is replaced by the quoted state_schema.

-- Keyset positions of the poller's two lanes (SPEC G11): 'live' follows changes from the
-- first start on, 'backfill' walks the rows that existed before it, up to until_at.
CREATE TABLE {schema}.cursors (
    lane        text PRIMARY KEY CHECK (lane IN ('live', 'backfill')),
    updated_at  timestamptz,          -- last (updated_at, id) read; NULL: from the very start
    last_id     text,
    until_at    timestamptz,          -- backfill only: the moment the live lane began
    done        boolean NOT NULL DEFAULT false,
    changed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- One row per source user ever staged: what the poller saw, what the API last accepted.
-- A user is "ready" when dirty and in no open batch; that set is the queue of work.
CREATE TABLE {schema}.sync_state (
    user_id          text PRIMARY KEY,
    seen_updated_at  timestamptz NOT NULL,   -- newest source updated_at staged
    dirty            boolean NOT NULL DEFAULT true,
    lane             smallint NOT NULL DEFAULT 0,   -- 0 live (and replays), 1 backfill
    dirty_since      timestamptz NOT NULL DEFAULT clock_timestamp(),
    batch_id         bigint,                 -- the open batch holding the user (G6: one at a time)
    sent_hash        bytea,                  -- content hash of the payload the API accepted (G4)
    sent_updated_at  timestamptz,
    sent_at          timestamptz
);
CREATE INDEX sync_state_ready ON {schema}.sync_state (lane, dirty_since, user_id)
    WHERE dirty AND batch_id IS NULL;
CREATE INDEX sync_state_batch ON {schema}.sync_state (batch_id) WHERE batch_id IS NOT NULL;

-- The durable queue: a batch is formed by the worker that sends it, leased while it works.
CREATE TABLE {schema}.batches (
    id           bigserial PRIMARY KEY,
    queue        text NOT NULL,
    lane         smallint NOT NULL DEFAULT 0,
    status       text NOT NULL DEFAULT 'claimed'
                 CHECK (status IN ('pending', 'claimed', 'done', 'failed')),
    user_ids     text[] NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,     -- attempts spent (429/401 do not spend one)
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    claimed_by   text,
    lease_until  timestamptz,
    not_before   timestamptz,                    -- the next attempt starts no earlier
    finished_at  timestamptz,
    last_status  integer,
    last_error   text
);
CREATE INDEX batches_open ON {schema}.batches (status, not_before, id)
    WHERE status IN ('pending', 'claimed');
CREATE INDEX batches_finished ON {schema}.batches (finished_at) WHERE finished_at IS NOT NULL;

-- The request ledger: one row per request start (G1), the quota's authority and the audit trail.
CREATE TABLE {schema}.requests (
    id                   bigserial PRIMARY KEY,
    started_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind                 text NOT NULL,  -- send | retry | replay | probe | external
    batch_id             bigint,
    attempt              integer,
    users                integer,
    status               integer,
    outcome              text,
    duration_ms          double precision,
    request_id           text,
    response_request_id  text,
    error                text,
    worker               text
);
CREATE INDEX requests_started ON {schema}.requests (started_at);

-- The dead letters (SPEC §6): what could not be delivered, and why.
CREATE TABLE {schema}.failures (
    id               bigserial PRIMARY KEY,
    kind             text NOT NULL,       -- invalid | rejected | exhausted | too_large
    user_ids         text[] NOT NULL,
    field            text,                -- invalid records: the API field at fault
    error            text NOT NULL,
    http_status      integer,
    attempts         integer NOT NULL DEFAULT 1,
    request_id       text,
    batch_id         bigint,
    payload          jsonb,               -- the last payload, never a secret
    first_failed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_failed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    replayed_at      timestamptz,
    replay_outcome   text,
    resolved_at      timestamptz,
    resolution       text                 -- synced (the user was sent later) | replayed
);
CREATE INDEX failures_open ON {schema}.failures (id) WHERE resolved_at IS NULL;
CREATE INDEX failures_users ON {schema}.failures USING gin (user_ids);

-- Sending paused for the whole pipeline, by every replica: 429 until a time, 401/403 until a probe works.
CREATE TABLE {schema}.pauses (
    reason    text PRIMARY KEY CHECK (reason IN ('rate_limited', 'credentials')),
    until_at  timestamptz,
    detail    text,
    since     timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Live processes, for `status` (a row older than a few heartbeats is a dead process).
CREATE TABLE {schema}.processes (
    id            text PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    version       text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
