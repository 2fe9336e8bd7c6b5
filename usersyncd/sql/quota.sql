-- The request quota (usersyncd/quota.py): the ledger `requests` and the `pauses`.
-- {schema} is replaced by the quoted state_schema. Times come from the database clock.

-- lock_ledger --
-- Serialise every quota decision of every process sharing this schema, until the transaction ends;
-- and commit it at least with synchronous_commit = on (remote_apply stays): the ledger must survive
-- a failover even where the operator's default is off (a lost grant frees a slot that was used).
SELECT pg_advisory_xact_lock(hashtext('usersyncd.quota:' || $1)),
       set_config('synchronous_commit',
                  CASE WHEN current_setting('synchronous_commit') = 'remote_apply' THEN 'remote_apply'
                       ELSE 'on' END,
                  true)

-- ledger_window --
-- The database clock, and the starts of the last $1 seconds in seconds relative to it (<= 0), oldest first.
-- A request with no answer recorded (outcome NULL: granted, in flight, or its process died) may not
-- have arrived yet: it may arrive as late as now, or at most $2 seconds (api.timeout, the client's
-- deadline from the stamp) after its stamp. It counts as starting at the latest of those less the
-- margin ($3 s), which covers any arrival then: a request whose arrival is unknown keeps its slot.
SELECT c.now,
       ARRAY(SELECT s.at FROM (
                 SELECT extract(epoch FROM
                            CASE WHEN r.outcome IS NOT NULL THEN r.started_at
                                 ELSE greatest(r.started_at,
                                               least(c.now, r.started_at + make_interval(secs => $2))
                                               - make_interval(secs => $3))
                            END - c.now)::float8 AS at
                 FROM {schema}.requests AS r
                 WHERE r.started_at > c.now - make_interval(secs => $1 + $2)) AS s
             WHERE s.at > -$1
             ORDER BY s.at) AS starts
FROM (SELECT clock_timestamp() AS now) AS c

-- last_grant --
-- The latest grant within the last $2 seconds before the moment $1, in seconds relative to it (<= 0).
SELECT extract(epoch FROM max(granted_at) - $1::timestamptz)::float8
FROM {schema}.requests
WHERE granted_at > $1::timestamptz - make_interval(secs => $2)

-- pauses --
-- Every pause, with the seconds left of it at the moment $1, or now if NULL (zero, negative or NULL: over).
SELECT reason, extract(epoch FROM until_at - coalesce($1::timestamptz, clock_timestamp()))::float8 AS remaining,
       detail
FROM {schema}.pauses
ORDER BY reason

-- end_rate_limit --
-- Drop a rate-limit pause that is over at the moment $1.
DELETE FROM {schema}.pauses
WHERE reason = 'rate_limited' AND (until_at IS NULL OR until_at <= $1::timestamptz)

-- schedule_probe --
-- A credentials probe goes out now: the next one no earlier than $1 seconds from now.
UPDATE {schema}.pauses
SET until_at = clock_timestamp() + make_interval(secs => $1)
WHERE reason IN ('credentials', 'configuration')

-- reopen_probe --
-- A granted probe was not sent: let the next acquirer probe at once.
UPDATE {schema}.pauses
SET until_at = clock_timestamp()
WHERE reason IN ('credentials', 'configuration') AND until_at > clock_timestamp()

-- insert_start --
-- Take a slot: one ledger row per request start, stamped with the database clock; a paced grant
-- records its place in the pace ($6 seconds from now, <= 0; NULL: now).
INSERT INTO {schema}.requests (kind, batch_id, attempt, users, worker, granted_at)
VALUES ($1, $2, $3, $4, $5, clock_timestamp() + make_interval(secs => coalesce($6, 0)))
RETURNING id, started_at

-- isolate_window --
-- Starts of isolation requests (SPEC §2, limits.isolate_share) within $2 seconds before the moment $1,
-- in seconds relative to it (<= 0): their own budget within the quota.
SELECT ARRAY(SELECT extract(epoch FROM started_at - $1::timestamptz)::float8
             FROM {schema}.requests
             WHERE kind = 'isolate' AND started_at > $1::timestamptz - make_interval(secs => $2)
             ORDER BY started_at)

-- delete_start --
-- Give a slot back: the request never started.
DELETE FROM {schema}.requests WHERE id = $1

-- record_result --
-- What became of a request. The API counts arrivals, and the request arrived before its answer and
-- before its deadline ($8 s, api.timeout, after its stamp): its stamp moves to the margin ($9 s)
-- before the earlier of now and that deadline, so that the margin covers any delay between the
-- stamp and the arrival. Moving a stamp later only holds its slot longer, and until now the row
-- held it as ledger_window counts a request with no answer, never less.
-- $10, $11: the API's X-RateLimit-Remaining and -Limit; $12: other clients' requests learnt from them.
UPDATE {schema}.requests
SET status = $2, outcome = $3, duration_ms = $4, request_id = $5, response_request_id = $6,
    error = $7, rate_limit_remaining = $10, rate_limit_limit = $11, others = $12,
    started_at = greatest(started_at,
                          least(clock_timestamp(), started_at + make_interval(secs => $8))
                          - make_interval(secs => $9))
WHERE id = $1

-- ours_at --
-- For a request that started at $1: our starts within the API's window ($2 s) up to it, itself
-- included (the API counts arrivals in its window, not in our span).
SELECT count(*)
FROM {schema}.requests
WHERE kind <> 'external' AND started_at <= $1::timestamptz
  AND started_at > $1::timestamptz - make_interval(secs => $2)

-- others_seen --
-- What responses said of other clients' requests on the account: (seconds relative to the moment
-- $1, or to now if NULL; count) of those within the last $2 seconds, and of the latest at any age.
WITH c AS (SELECT coalesce($1::timestamptz, clock_timestamp()) AS now),
seen AS (
    (SELECT r.started_at, r.others FROM {schema}.requests AS r, c
     WHERE r.others IS NOT NULL AND r.started_at > c.now - make_interval(secs => $2))
    UNION
    (SELECT started_at, others FROM {schema}.requests WHERE others IS NOT NULL
     ORDER BY started_at DESC LIMIT 1)
)
SELECT coalesce(array_agg(extract(epoch FROM s.started_at - c.now)::float8 ORDER BY s.started_at), '{}') AS times,
       coalesce(array_agg(s.others ORDER BY s.started_at), '{}') AS counts
FROM seen AS s, c

-- notify_freed --
-- Sending may start earlier than the waiters computed (a slot released, a pause resumed, more room):
-- wake them in every process (delivered at commit; the payload is the schema, $1).
SELECT pg_notify('usersyncd_quota', $1)

-- upsert_pause --
-- Pause sending for $2 seconds; a rate-limit pause keeps the later end, a credentials pause the new one.
INSERT INTO {schema}.pauses AS p (reason, until_at, detail)
VALUES ($1, clock_timestamp() + make_interval(secs => $2), $3)
ON CONFLICT (reason) DO UPDATE
SET until_at = CASE WHEN p.reason = 'rate_limited' THEN greatest(p.until_at, excluded.until_at)
                    ELSE excluded.until_at END,
    detail = excluded.detail,
    since = CASE WHEN p.reason = 'rate_limited' AND p.until_at <= clock_timestamp()
                 THEN clock_timestamp() ELSE p.since END
RETURNING extract(epoch FROM until_at - clock_timestamp())::float8 AS remaining, (xmax = 0) AS fresh

-- delete_pause --
-- End a pause (a probe got through); returns the row if there was one.
DELETE FROM {schema}.pauses WHERE reason = $1 RETURNING reason, since

-- prune --
-- Drop ledger rows older than $1 seconds (the caller never passes less than the span), but the
-- latest that says what other clients use (a budget learnt is kept until more room shows); count them.
WITH gone AS (
    DELETE FROM {schema}.requests
    WHERE started_at < clock_timestamp() - make_interval(secs => $1)
      AND id IS DISTINCT FROM (SELECT id FROM {schema}.requests WHERE others IS NOT NULL
                               ORDER BY started_at DESC LIMIT 1)
    RETURNING 1
)
SELECT count(*) FROM gone

-- confirm_start --
-- The request starts now: move its stamp to now, unless a span has passed since the grant
-- (then later grants may have relied on the old stamp, and the slot is no longer good).
UPDATE {schema}.requests
SET started_at = clock_timestamp()
WHERE id = $1 AND clock_timestamp() < started_at + make_interval(secs => $2)
RETURNING started_at
