-- An unsubscribe request for the user started and its answer never came (the process died, the
-- request timed out): the API may hold the subscriber unsubscribed or not. Set just before every
-- unsubscribe request; cleared when an answer says which (an unsubscribe accepted sets
-- unsubscribed_at; a subscribe accepted, sent with "status": "active" because of this flag,
-- re-subscribed it). A row that comes back meanwhile is subscribed with "status": "active"
-- (SPEC G12; found by the chaos soak: without it the subscriber stayed unsubscribed).
ALTER TABLE {schema}.sync_state ADD COLUMN unsubscribing boolean NOT NULL DEFAULT false;
