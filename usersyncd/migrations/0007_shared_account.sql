-- What the API said about the account's quota on each answer (X-RateLimit-Remaining, -Limit), and
-- how many requests of other clients it counted then: the learnt budget is kept until a response
-- shows more room (SPEC §2), so the latest such row is found by an index, whatever its age.
ALTER TABLE {schema}.requests
    ADD COLUMN rate_limit_remaining integer,
    ADD COLUMN rate_limit_limit integer,
    ADD COLUMN others integer;
CREATE INDEX requests_others ON {schema}.requests (started_at) WHERE others IS NOT NULL;
