-- When the last whole lookback re-read began (its first statement), by whichever process: the
-- next re-read starts `lookback` before it, not before the live cursor. A row committed after
-- that re-read began was stamped at most `lookback` earlier (SPEC G3); the cursor, moved on by
-- the polls meanwhile, may be more than `lookback` past it when re-reads ran late (a database
-- outage, a busy machine, a restart). Found by the chaos soak: such late commits were never sent.
ALTER TABLE {schema}.cursors ADD COLUMN reread_at timestamptz;
