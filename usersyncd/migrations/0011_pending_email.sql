-- The other end of a rename whose answer never came (a timeout, a crash after sending): the API
-- holds this user's subscriber under sent_email or under this one, nobody knows which (SPEC G12).
-- Set before a request carrying the rename starts, cleared when an answer is recorded; a later
-- send is built so that it lands on the right subscriber either way (records.subscriber).
ALTER TABLE {schema}.sync_state ADD COLUMN pending_email text;
