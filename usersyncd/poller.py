"""UserSyncService: polls the users table and stages changed users for the workers.

Two lanes (G11). `live` follows rows changed since the first start, re-scanning `lookback`
seconds behind its cursor so rows committed late by long transactions are not missed.
`backfill` walks the rows that existed before the first start, staging only a bounded
lookahead (two windows of quota) so a backlog of millions stays in the source table.
Staging is one SQL statement per page, in the transaction that advances the cursor; no row
is held in memory.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from loguru import logger

from usersyncd import db
from usersyncd.config import Config
from usersyncd.source import Source

PAGE_SIZE = 5000  # rows per staging statement
BEGINNING = datetime(1, 1, 1, tzinfo=UTC)  # before any real updated_at
LIVE, BACKFILL = 0, 1


@dataclass
class PollResult:
    read: int = 0
    staged: int = 0
    live_staged: int = 0  # of which in the live lane
    caught_up: bool = False  # the live lane reached the end and the backfill is done


class UserSyncService:
    def __init__(
        self,
        config: Config,
        pool: asyncpg.Pool,
        source: Source,
        *,
        work_ready: asyncio.Event,
        live_ready: asyncio.Event | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.source = source
        self.work_ready = work_ready
        self.live_ready = live_ready  # set when live users are staged: they need not wait the pace
        self.sql = db.queries("poller", config.database.state_schema)
        schema = config.database.state_schema
        self._live_sql = {
            has_id: source.stage_page_sql(schema, has_cursor_id=has_id, bounded=False)
            for has_id in (False, True)
        }
        self._backfill_sql = {
            has_id: source.stage_page_sql(schema, has_cursor_id=has_id, bounded=True)
            for has_id in (False, True)
        }
        # Staged but unsent backfill users, at most: two windows of quota.
        self.lookahead = 2 * config.limits.requests * config.limits.batch_size
        self.last: PollResult = PollResult()

    async def init_cursors(self) -> None:
        """First start only: the live lane begins now, the backfill lane at `start_from`."""
        start_from = self.config.source.start_from
        moment = self.config.source.start_moment()
        async with self.pool.acquire() as conn, conn.transaction():
            now = await conn.fetchval("SELECT clock_timestamp()")
            backfill_from = BEGINNING if start_from == "beginning" else moment
            created = await conn.fetchval(
                self.sql["init_cursors"],
                now,
                backfill_from,
                backfill_from is None or backfill_from >= now,
            )
        if created:
            logger.bind(live_from=now.isoformat(), backfill_from=str(backfill_from)).info("cursors created")

    async def poll_once(self) -> PollResult:
        result = PollResult()
        live_done = await self._poll_live(result)
        backfill_done = await self._poll_backfill(result)
        result.caught_up = live_done and backfill_done
        if result.staged:
            self.work_ready.set()
        if result.live_staged and self.live_ready is not None:
            self.live_ready.set()
        cursors = await self.pool.fetch(self.sql["cursors"])
        entry = logger.bind(
            rows_read=result.read,
            users_staged=result.staged,
            cursor={r["lane"]: r["updated_at"].isoformat() if r["updated_at"] else None for r in cursors},
        )
        # every poll is logged; at INFO when it found something to send
        (entry.info if result.staged else entry.debug)("poll")
        self.last = result
        return result

    async def _poll_live(self, result: PollResult) -> bool:
        """Scan from the live cursor minus lookback to the end. True when the end was reached."""
        async with self.pool.acquire() as conn:
            cursor = await conn.fetchrow(self.sql["cursor"], "live")
        start = cursor["updated_at"] - timedelta(seconds=self.config.source.lookback)
        last_id: str | None = None
        while True:
            async with self.pool.acquire() as conn, conn.transaction():
                page = await conn.fetchrow(
                    self._live_sql[last_id is not None], start, last_id, PAGE_SIZE, LIVE
                )
                if page["read"]:
                    # never ahead of the database clock: a row stamped in the future would
                    # otherwise move the cursor past rows still to come
                    await conn.execute(self.sql["advance_live"], page["last_updated_at"])
            result.read += page["read"]
            result.staged += page["staged"]
            result.live_staged += page["staged"]
            if page["read"] < PAGE_SIZE:
                return True
            start, last_id = page["last_updated_at"], page["last_id"]

    async def _poll_backfill(self, result: PollResult) -> bool:
        """Stage the next backfill pages while the lookahead has room. True when finished."""
        while True:
            async with self.pool.acquire() as conn, conn.transaction():
                cursor = await conn.fetchrow(self.sql["cursor"], "backfill")
                if cursor is None or cursor["done"]:
                    return True
                waiting = await conn.fetchval(self.sql["backfill_waiting"], self.lookahead)
                room = min(PAGE_SIZE, self.lookahead - waiting)
                if room <= 0:
                    return False
                page = await conn.fetchrow(
                    self._backfill_sql[cursor["last_id"] is not None],
                    cursor["updated_at"],
                    cursor["last_id"],
                    room,
                    BACKFILL,
                    cursor["until_at"],
                )
                finished = page["read"] < room
                await conn.execute(
                    self.sql["advance_backfill"],
                    page["last_updated_at"] or cursor["updated_at"],
                    page["last_id"] or cursor["last_id"],
                    finished,
                )
            result.read += page["read"]
            result.staged += page["staged"]
            if finished:
                logger.info("backfill finished: every row that existed at the first start is staged")
                return True

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every `poll_interval` until `stop`; a lost database is waited out, never fatal."""
        await db.retrying(self.init_cursors, what="init cursors", stop=stop)
        while not stop.is_set():
            await db.retrying(self.poll_once, what="poll", stop=stop)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.config.source.poll_interval)
            except TimeoutError:
                pass
