-- What the API last accepted for each user beyond its hash (SPEC G12): the email it keys the
-- subscriber by (a changed email is sent as a rename from it; a user gone from the table is
-- unsubscribed under it) and the tags sent (tags removed since go as remove_tags).
ALTER TABLE {schema}.sync_state ADD COLUMN sent_email text;
ALTER TABLE {schema}.sync_state ADD COLUMN sent_tags jsonb;
