-- The reconciliation pass (usersyncd/reconcile.py, G12). {schema} is the quoted state schema.

-- take --
-- The pass's row, locked for one chunk, when a pass is under way or due (the last one ended $1
-- seconds ago or more); no row when another replica holds it or none is due.
SELECT after_id, coalesce(pass_started_at, clock_timestamp()) AS started_at, pass_started_at IS NULL AS new_pass
FROM {schema}.reconcile
WHERE pass_started_at IS NOT NULL OR last_pass_at IS NULL
   OR last_pass_at <= clock_timestamp() - make_interval(secs => $1)
FOR UPDATE SKIP LOCKED;

-- advance --
-- After a chunk ($1 when the pass started, $2 users checked, $3 found): the pass moves on to
-- after $4, or, $4 NULL, ends (its figures become the last pass's).
UPDATE {schema}.reconcile
SET after_id = $4,
    pass_started_at = CASE WHEN $4::text IS NULL THEN NULL ELSE $1::timestamptz END,
    pass_checked = CASE WHEN $4::text IS NULL THEN 0 ELSE pass_checked + $2 END,
    pass_found = CASE WHEN $4::text IS NULL THEN 0 ELSE pass_found + $3 END,
    last_pass_at = CASE WHEN $4::text IS NULL THEN clock_timestamp() ELSE last_pass_at END,
    last_pass_seconds = CASE WHEN $4::text IS NULL
                             THEN extract(epoch FROM clock_timestamp() - $1::timestamptz)::float8 ELSE last_pass_seconds END,
    last_pass_checked = CASE WHEN $4::text IS NULL THEN pass_checked + $2 ELSE last_pass_checked END,
    last_pass_found = CASE WHEN $4::text IS NULL THEN pass_found + $3 ELSE last_pass_found END
RETURNING pass_checked, pass_found, last_pass_seconds, last_pass_checked, last_pass_found;

-- state --
-- For status: the last whole pass and the one under way.
SELECT last_pass_at, last_pass_seconds, last_pass_checked, last_pass_found,
       pass_started_at, pass_checked, pass_found
FROM {schema}.reconcile;

-- due_now --
-- A pass is due at once (tests, benchmarks), unless one is under way.
UPDATE {schema}.reconcile SET last_pass_at = NULL WHERE pass_started_at IS NULL;
