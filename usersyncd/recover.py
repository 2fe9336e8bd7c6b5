"""What the API holds for users accepted before usersyncd kept it (G12, migration 0010).

A user whose `sync_state` has a `sent_hash` but no `sent_email` was last accepted by a version
that kept only the hash: an email change would go as a plain send (a second subscriber at
Drip) and a deletion could not be unsubscribed. Once per start, in chunks by the partial index
of such users, each one's current row is read and hashed as the former hashes it: where it still
equals `sent_hash`, the API holds exactly this payload, so its email (and tags) are what the API
keys the subscriber by, and they are written to `sync_state`. A row that changed since its last
send cannot be told apart: its email stays unknown until its next accepted send records it.
Each chunk is one short transaction; a user a worker recorded meanwhile is left alone (the
update requires the hash read and a NULL email, on rows locked in user_id order).
"""

from __future__ import annotations

import asyncio
import functools

import asyncpg
from loguru import logger

from usersyncd import db, records
from usersyncd.config import Config
from usersyncd.source import Source

CHUNK = 1000  # users per chunk


class Recovery:
    def __init__(self, config: Config, pool: asyncpg.Pool, source: Source, *, chunk: int = CHUNK) -> None:
        self.config = config
        self.pool = pool
        self.source = source
        self.chunk = chunk
        schema = db.quote_ident(config.database.state_schema)
        self._unknown_sql = f"""
            SELECT user_id, sent_hash FROM {schema}.sync_state
            WHERE sent_hash IS NOT NULL AND sent_email IS NULL AND user_id > $1
            ORDER BY user_id LIMIT $2
        """
        self._record_sql = f"""
            WITH found AS (
                SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[])
                    AS f(user_id, hash, email, tags)
            ), locked AS (
                SELECT s.user_id FROM {schema}.sync_state AS s
                WHERE s.user_id IN (SELECT user_id FROM found)
                ORDER BY s.user_id  -- every writer of sync_state locks rows in user_id order
                FOR UPDATE
            )
            UPDATE {schema}.sync_state AS s
            SET sent_email = found.email, sent_tags = found.tags::jsonb
            FROM found JOIN locked USING (user_id)
            WHERE s.user_id = found.user_id AND s.sent_hash = found.hash AND s.sent_email IS NULL
        """

    async def step(self, after: str) -> tuple[int, int, str | None]:
        """One chunk after `after`: (users looked at, emails recovered, the last user or None at the end)."""
        fields = self.config.source.fields
        async with self.pool.acquire() as conn, conn.transaction():
            unknown = await conn.fetch(self._unknown_sql, after, self.chunk)
            if not unknown:
                return 0, 0, None
            rows = await self.source.fetch(conn, [r["user_id"] for r in unknown])
            found: tuple[list[str], list[bytes], list[str], list[str | None]] = ([], [], [], [])
            for user in unknown:
                row = rows.get(user["user_id"])
                if row is None:
                    continue  # gone: the reconciliation pass cannot unsubscribe it either (README)
                payload = records.validate(user["user_id"], row.values, fields)
                if isinstance(payload, records.Invalid) or records.content_hash(payload) != user["sent_hash"]:
                    continue
                for column, value in zip(
                    found,
                    (user["user_id"], user["sent_hash"], payload[records.EMAIL], records.tags_json(payload)),
                    strict=True,
                ):
                    column.append(value)
            status = await conn.execute(self._record_sql, *found) if found[0] else "UPDATE 0"
        return len(unknown), int(status.split()[-1]), unknown[-1]["user_id"]

    async def run(self, stop: asyncio.Event) -> int:
        """The whole walk, once; a lost database is waited out. Returns the emails recovered."""
        looked = recovered = 0
        after: str | None = ""
        while after is not None and not stop.is_set():
            chunk_looked, chunk_recovered, after = await db.retrying(
                functools.partial(self.step, after), what="recover sent emails", stop=stop
            )
            looked, recovered = looked + chunk_looked, recovered + chunk_recovered
            await asyncio.sleep(0)
        if looked:
            logger.bind(users=looked, recovered=recovered, unknown=looked - recovered).info(
                "emails the API holds recovered for users sent before they were kept"
            )
        return recovered
