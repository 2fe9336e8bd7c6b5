-- The durable queue: users waiting in sync_state, batches formed by the worker that sends them.
-- {schema} is the quoted state schema. Every statement here is one transaction.

-- has_work --
-- Is there anything a worker could send now? (ready users, or a released / abandoned batch;
-- $2: api.timeout, see claim_open_batch)
SELECT EXISTS (SELECT 1 FROM {schema}.sync_state WHERE dirty AND batch_id IS NULL)
    OR EXISTS (SELECT 1 FROM {schema}.batches b
               WHERE queue = $1 AND coalesce(not_before, '-infinity') <= clock_timestamp()
                 AND (status = 'pending' OR (status = 'claimed' AND lease_until < clock_timestamp()
                      AND NOT EXISTS (SELECT 1 FROM {schema}.requests r
                                      WHERE r.batch_id = b.id AND r.outcome IS NULL
                                        AND r.started_at > clock_timestamp() - make_interval(secs => $2)))));

-- has_ready --
-- Is any user waiting to be taken into a batch?
SELECT EXISTS (SELECT 1 FROM {schema}.sync_state WHERE dirty AND batch_id IS NULL);

-- has_live_ready --
-- Is a user of the live lane waiting? (they are not held to the backfill's pace)
SELECT EXISTS (SELECT 1 FROM {schema}.sync_state WHERE dirty AND batch_id IS NULL AND lane = 0);

-- has_paced_ready --
-- Is a user of the paced lane waiting? (then the quota is spent at the pace: live users ride
-- at the head of the next paced batch instead of taking a slot ahead of it)
SELECT EXISTS (SELECT 1 FROM {schema}.sync_state WHERE dirty AND batch_id IS NULL AND lane = 1);

-- claim_open_batch --
-- Take a released batch that is due, or one whose worker vanished (lease expired).
-- Its users are those sync_state still puts in it: a worker killed between taking users and
-- recording them in user_ids (or after sending part of them) leaves user_ids stale, and a user
-- whose sync_state points at a finished batch would wait forever.
-- An abandoned batch whose last request started less than $4 seconds (api.timeout) ago and has
-- no answer recorded waits: its worker lost the database, not necessarily the request, which
-- may still be in flight until its timeout (G6; found by the chaos soak).
UPDATE {schema}.batches b
SET status = 'claimed', claimed_by = $2, lease_until = clock_timestamp() + make_interval(secs => $3),
    user_ids = ARRAY(SELECT s.user_id FROM {schema}.sync_state s WHERE s.batch_id = b.id ORDER BY s.user_id)
WHERE b.id = (
    SELECT id FROM {schema}.batches
    WHERE queue = $1
      AND ((status = 'pending' AND coalesce(not_before, '-infinity') <= clock_timestamp())
        OR (status = 'claimed' AND lease_until < clock_timestamp()
            AND coalesce(not_before, '-infinity') <= clock_timestamp()
            AND NOT EXISTS (SELECT 1 FROM {schema}.requests r
                            WHERE r.batch_id = batches.id AND r.outcome IS NULL
                              AND r.started_at > clock_timestamp() - make_interval(secs => $4))))
    ORDER BY lane, id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING b.id, b.lane, b.action, b.user_ids, b.attempts, b.last_status, b.last_error, b.last_kind;

-- new_batch --
-- An empty batch, claimed by its creator, that users are then added to.
INSERT INTO {schema}.batches (queue, user_ids, claimed_by, lease_until)
VALUES ($1, '{}', $2, clock_timestamp() + make_interval(secs => $3))
RETURNING id;

-- form_lock --
-- Serialises batch formation across workers and replicas (held to the end of the transaction).
SELECT pg_advisory_xact_lock(hashtext('usersyncd.form:' || $1));

-- take_ready --
-- Move up to $2 ready users into batch $1: live lane first, then the oldest waiting. With $4
-- (on_delete = "unsubscribe") a batch is all subscribes or all unsubscribes: only users whose
-- `gone` is $3, or, for $3 NULL (the batch's first round), the first ready user's. With what
-- user_state reads of them (read before the users' rows: no round trip more per batch).
WITH picked AS (
    SELECT user_id FROM {schema}.sync_state
    WHERE dirty AND batch_id IS NULL
      AND (NOT $4::boolean OR gone = coalesce($3::boolean, (
          SELECT gone FROM {schema}.sync_state WHERE dirty AND batch_id IS NULL
          ORDER BY lane, dirty_since, user_id LIMIT 1)))
    ORDER BY lane, dirty_since, user_id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.sync_state s SET batch_id = $1
FROM picked WHERE s.user_id = picked.user_id
RETURNING s.user_id, s.lane, s.gone, s.sent_hash, s.stage_seq, s.sent_email, s.pending_email,
    s.sent_tags, s.unsubscribed_at, s.unsubscribing;

-- user_state --
-- What the API last accepted for these users, and how often each was staged (read before
-- their rows, so a staging after the read leaves them dirty); whether it holds them
-- unsubscribed (G12). The columns `take_ready` returns too.
SELECT user_id, sent_hash, stage_seq, sent_email, pending_email, sent_tags, unsubscribed_at, unsubscribing
FROM {schema}.sync_state WHERE user_id = ANY($1::text::text[]);

-- mark_pending --
-- Just before a request carrying renames: the email each renamed user of batch $1 ($2 ids, $3
-- emails) is keyed by if the request lands and its answer is lost (cleared by mark_sent).
UPDATE {schema}.sync_state s SET pending_email = r.email
FROM unnest($2::text[], $3::text[]) AS r(user_id, email)
WHERE s.user_id = r.user_id AND s.batch_id = $1 AND s.pending_email IS DISTINCT FROM r.email;

-- mark_unsubscribing --
-- Just before an unsubscribe request of batch $1 ($2 ids): should it land unanswered, the API
-- holds them unsubscribed, and a row that comes back must be sent with "status": "active".
UPDATE {schema}.sync_state s SET unsubscribing = true
WHERE s.user_id = ANY($2::text[]) AND s.batch_id = $1 AND NOT s.unsubscribing;

-- clear_pending --
-- The API refused renames it was sent ($1 ids, $2 their NEW emails): none of them landed, so
-- the subscriber is under sent_email for certain (a later send starts from it again).
UPDATE {schema}.sync_state s SET pending_email = NULL
FROM unnest($1::text[], $2::text[]) AS r(user_id, email)
WHERE s.user_id = r.user_id AND s.pending_email = r.email;

-- lock_users --
-- Lock these users' rows in user_id order, the order every writer of sync_state uses (no deadlock).
SELECT 1 FROM {schema}.sync_state WHERE user_id = ANY($1::text::text[]) ORDER BY user_id FOR UPDATE;

-- set_members --
-- The users the batch will carry (after dropping the unchanged, invalid and missing), and
-- whether it subscribes or unsubscribes them ($4).
UPDATE {schema}.batches SET user_ids = $2::text::text[], lane = coalesce($3, lane), action = $4 WHERE id = $1;

-- drop_users --
-- Users leaving a batch unsent (unchanged, invalid, missing): they wait again only if they
-- were staged again since they were read ($2: user ids, $3: stage_seq when read). $4: 'unchanged'
-- or 'gone' when the API needs nothing for the user (settled, if not staged since), else NULL.
-- A user found 'gone' is marked so (status counts those the API still holds).
UPDATE {schema}.sync_state s
SET batch_id = NULL,
    dirty = s.stage_seq > r.seq,
    gone = CASE WHEN r.settled = 'gone' AND s.stage_seq = r.seq THEN true ELSE s.gone END,
    settled_at = CASE WHEN r.settled IS NOT NULL AND s.stage_seq = r.seq
                      THEN clock_timestamp() ELSE s.settled_at END,
    settled = CASE WHEN r.settled IS NOT NULL AND s.stage_seq = r.seq THEN r.settled ELSE s.settled END
FROM unnest($2::text[], $3::bigint[], $4::text[]) AS r(user_id, seq, settled)
WHERE s.user_id = r.user_id AND s.batch_id = $1;

-- move_users --
-- Users leaving a batch for one of the other action, still dirty: a row found deleted or
-- filtered out in a subscribe batch ($3 true: to be unsubscribed), or found back in an
-- unsubscribe batch ($3 false: to be subscribed again).
UPDATE {schema}.sync_state s
SET batch_id = NULL, dirty = true, gone = $3
WHERE s.user_id = ANY($2::text[]) AND s.batch_id = $1;

-- members_of --
-- The users sync_state puts in batch $1 (those taken, even if the batch row was not told yet).
SELECT user_id FROM {schema}.sync_state WHERE batch_id = $1 ORDER BY user_id;

-- put_back --
-- Users taken beyond a full batch wait again, still dirty, in their place in the queue.
UPDATE {schema}.sync_state SET batch_id = NULL WHERE batch_id = $1 AND user_id = ANY($2::text[]);

-- mark_sent --
-- The API accepted these users with these contents ($2 ids, $3 hashes, $4 updated_at read,
-- $5 stage_seq when read, $6 the email the API now keys each by, $7 the tags sent as JSON or
-- NULL, $8 sent under another email than its row's): they wait again only if staged again
-- since, or $8. Only while the batch is still worker $9's: a batch taken over (its lease ran
-- out while the database was away) may be in flight again under its new worker, and freeing
-- its users now would let a change of one go out in a second request at the same time (G6);
-- the new worker sends them again and records that.
UPDATE {schema}.sync_state s
SET batch_id = NULL,
    sent_hash = r.hash,
    sent_email = r.email,
    pending_email = NULL,
    sent_tags = r.tags,
    sent_updated_at = r.read_at,
    sent_at = clock_timestamp(),
    settled_at = clock_timestamp(),
    settled = 'sent',
    unsubscribed_at = NULL,
    unsubscribing = false,
    gone = CASE WHEN s.stage_seq > r.seq THEN s.gone ELSE false END,
    dirty = s.stage_seq > r.seq OR r.again
FROM unnest($2::text::text[], $3::bytea[], $4::text::timestamptz[], $5::bigint[], $6::text::text[], $7::jsonb[], $8::bool[])
    AS r(user_id, hash, read_at, seq, email, tags, again)
WHERE s.user_id = r.user_id AND s.batch_id = $1
  AND EXISTS (SELECT 1 FROM {schema}.batches b WHERE b.id = $1 AND b.claimed_by = $9 AND b.status = 'claimed');

-- mark_unsubscribed --
-- The API accepted the unsubscribe of these users ($2 ids, $3 stage_seq when read): settled as
-- 'gone'. What it last accepted is forgotten (a row that comes back is sent again, whole, with
-- "status": "active"); sent_email and sent_tags stay: the subscriber keeps them at the API.
-- They wait again only if staged again since. Only while the batch is still worker $4's (as
-- mark_sent).
UPDATE {schema}.sync_state s
SET batch_id = NULL,
    sent_hash = NULL,
    sent_at = clock_timestamp(),
    unsubscribed_at = clock_timestamp(),
    unsubscribing = false,
    settled_at = clock_timestamp(),
    settled = 'gone',
    dirty = s.stage_seq > r.seq
FROM unnest($2::text[], $3::bigint[]) AS r(user_id, seq)
WHERE s.user_id = r.user_id AND s.batch_id = $1
  AND EXISTS (SELECT 1 FROM {schema}.batches b WHERE b.id = $1 AND b.claimed_by = $4 AND b.status = 'claimed');

-- resolve_failures --
-- Open failures of users $1 whose every user is settled (sent, unchanged or gone) since it
-- failed resolve by themselves (G7). Found through failure_users (a btree, 1,000 lookups), and
-- run after the settling transaction committed: of two batches settling users of one failure at
-- once, the later one to look sees both.
UPDATE {schema}.failures f
SET resolved_at = clock_timestamp(), resolution = v.how,
    replay_outcome = CASE WHEN f.replayed_at IS NOT NULL THEN v.how ELSE f.replay_outcome END
FROM (
    SELECT o.id, o.last_failed_at,
           CASE WHEN bool_or(s.settled = 'sent') THEN 'synced'
                WHEN bool_and(s.settled = 'gone') THEN 'gone' ELSE 'unchanged' END AS how
    FROM {schema}.failures o
    CROSS JOIN LATERAL unnest(o.user_ids) AS u(user_id)
    LEFT JOIN {schema}.sync_state s ON s.user_id = u.user_id
    WHERE o.id = ANY(ARRAY(SELECT failure_id FROM {schema}.failure_users WHERE user_id = ANY($1::text::text[])))
      AND o.resolved_at IS NULL
    GROUP BY o.id, o.last_failed_at
    HAVING bool_and(s.settled_at IS NOT NULL AND s.settled_at >= o.last_failed_at)
) v
-- the same ids again, so that the rows to update are fetched by key, never by a scan; a
-- failure that failed again meanwhile (newer last_failed_at) stays open
WHERE f.id = ANY(ARRAY(SELECT failure_id FROM {schema}.failure_users WHERE user_id = ANY($1::text::text[])))
  AND f.id = v.id AND f.resolved_at IS NULL AND f.last_failed_at = v.last_failed_at;

-- resolve_settled --
-- The same for every open failure: a pass with the pruning, for a resolution whose own step
-- did not run (the process stopped, the database went away between the two).
UPDATE {schema}.failures f
SET resolved_at = clock_timestamp(), resolution = v.how,
    replay_outcome = CASE WHEN f.replayed_at IS NOT NULL THEN v.how ELSE f.replay_outcome END
FROM (
    SELECT o.id, o.last_failed_at,
           CASE WHEN bool_or(s.settled = 'sent') THEN 'synced'
                WHEN bool_and(s.settled = 'gone') THEN 'gone' ELSE 'unchanged' END AS how
    FROM {schema}.failures o
    CROSS JOIN LATERAL unnest(o.user_ids) AS u(user_id)
    LEFT JOIN {schema}.sync_state s ON s.user_id = u.user_id
    WHERE o.resolved_at IS NULL
    GROUP BY o.id, o.last_failed_at
    HAVING bool_and(s.settled_at IS NOT NULL AND s.settled_at >= o.last_failed_at)
) v
WHERE f.id = v.id AND f.resolved_at IS NULL AND f.last_failed_at = v.last_failed_at;

-- finish_batch --
-- A batch ends: done (everything sent or dead-lettered) or failed. Only by its worker $5 (see
-- mark_sent): a batch another worker took over is that worker's to finish.
UPDATE {schema}.batches
SET status = $2, finished_at = clock_timestamp(), claimed_by = NULL, lease_until = NULL,
    last_status = $3, last_error = $4
WHERE id = $1 AND claimed_by = $5 AND status = 'claimed';

-- spend_attempt --
-- One more attempt spent on the batch; the next starts no earlier than $2 seconds from now.
-- $5: what failed ('exhausted' once attempts run out on API answers, 'error' on preparing).
UPDATE {schema}.batches
SET attempts = attempts + 1, last_status = $3, last_error = $4, last_kind = $5,
    not_before = clock_timestamp() + make_interval(secs => $2)
WHERE id = $1
RETURNING attempts;

-- release_batches --
-- Batches held by worker $1 (or, for a process id, by any of its workers) go back to the
-- queue, due after $2 seconds.
UPDATE {schema}.batches
SET status = 'pending', claimed_by = NULL, lease_until = NULL,
    not_before = greatest(coalesce(not_before, '-infinity'), clock_timestamp() + make_interval(secs => $2))
WHERE (claimed_by = $1 OR starts_with(claimed_by, $1 || '/')) AND status = 'claimed';

-- hold_batch --
-- Just before a request: the batch is still this worker's (not taken over after its lease ran
-- out); its lease is renewed. No row: someone else has it now.
UPDATE {schema}.batches SET lease_until = clock_timestamp() + make_interval(secs => $3)
WHERE id = $1 AND claimed_by = $2 AND status = 'claimed'
RETURNING id;

-- renew_leases --
-- This process is alive: extend the leases of the batches its workers hold.
UPDATE {schema}.batches SET lease_until = clock_timestamp() + make_interval(secs => $2)
WHERE (claimed_by = $1 OR starts_with(claimed_by, $1 || '/')) AND status = 'claimed';

-- record_failure --
-- Dead-letter users. An open failure of the same kind for the same single user is updated
-- instead of a new one; a replayed failure of these users that fails again says so. Failures
-- of these users are found through failure_users, which every new failure is added to.
WITH theirs AS (
    SELECT DISTINCT failure_id AS id FROM {schema}.failure_users WHERE user_id = ANY($2::text[])
), existing AS (
    UPDATE {schema}.failures
    SET error = $4, http_status = $5, attempts = attempts + $6, request_id = $7, batch_id = $8,
        payload = $9, last_failed_at = clock_timestamp(), field = $3,
        replay_outcome = CASE WHEN replayed_at IS NOT NULL THEN 'failed again' ELSE replay_outcome END
    WHERE id IN (SELECT id FROM theirs) AND resolved_at IS NULL AND kind = $1
      AND user_ids = $2::text[] AND cardinality($2::text[]) = 1
    RETURNING id
), inserted AS (
    INSERT INTO {schema}.failures (kind, user_ids, field, error, http_status, attempts, request_id, batch_id, payload)
    SELECT $1, $2::text[], $3, $4, $5, $6, $7, $8, $9
    WHERE NOT EXISTS (SELECT 1 FROM existing)
    RETURNING id
), indexed AS (
    INSERT INTO {schema}.failure_users (user_id, failure_id)
    SELECT DISTINCT u, inserted.id FROM inserted, unnest($2::text[]) AS u
), superseded AS (
    UPDATE {schema}.failures
    SET replay_outcome = 'failed again: see failure ' || (SELECT id FROM inserted),
        resolved_at = clock_timestamp(), resolution = 'replayed'
    WHERE id IN (SELECT id FROM theirs) AND resolved_at IS NULL AND replayed_at IS NOT NULL
      AND replay_outcome IS NULL AND EXISTS (SELECT 1 FROM inserted)
)
SELECT id FROM existing UNION ALL SELECT id FROM inserted;

-- backlog --
-- How much waits: ready users by lane, open batches, open failures.
SELECT
    (SELECT count(*) FROM {schema}.sync_state WHERE dirty AND batch_id IS NULL AND lane = 0) AS live_ready,
    (SELECT count(*) FROM {schema}.sync_state WHERE dirty AND batch_id IS NULL AND lane = 1) AS backfill_ready,
    (SELECT count(*) FROM {schema}.batches WHERE status IN ('pending', 'claimed')) AS open_batches,
    (SELECT count(*) FROM {schema}.failures WHERE resolved_at IS NULL) AS open_failures;

-- prune --
-- Finished batches older than the retention.
DELETE FROM {schema}.batches
WHERE finished_at IS NOT NULL AND finished_at < clock_timestamp() - make_interval(secs => $1);

-- prune_failures --
-- Failures resolved longer ago than the retention (their failure_users rows go with them).
DELETE FROM {schema}.failures
WHERE resolved_at IS NOT NULL AND resolved_at < clock_timestamp() - make_interval(secs => $1);
