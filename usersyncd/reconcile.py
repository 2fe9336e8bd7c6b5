"""The reconciliation pass (G12): finds users the API holds whose row was deleted with no other
change, which no poll can see (a deleted row has no `updated_at` to follow).

Every `source.reconcile_every` seconds it walks usersyncd's own `sync_state` by keyset on its
primary key, CHUNK users at a time; each chunk is one short transaction, one statement that
anti-joins the chunk's held users against the source table with its filter, by the source's id
(one index probe each). Nothing is held open across chunks, and the pass's place is kept in the
`reconcile` row, so a restart resumes it and replicas share it (a chunk is done by whoever holds
the row's lock). Users found are marked `gone`: with `on_delete = "unsubscribe"` they wait in the
paced lane for an unsubscribe batch; with "ignore" `status` counts them and nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import asyncpg
from loguru import logger

from usersyncd import db
from usersyncd.config import Config
from usersyncd.source import Source

CHUNK = 10_000  # users per chunk: one short transaction (about 0.1 s at 10,000)
CHECK_EVERY_MAX = 60.0  # seconds between looks for a due pass, at most


@dataclass(frozen=True)
class Chunk:
    checked: int  # users of sync_state looked at
    found: int  # of them marked gone now
    finished: bool  # the pass ended with this chunk


class Reconciler:
    """One pass at a time, a chunk per call; shared by replicas through the `reconcile` row."""

    def __init__(self, config: Config, pool: asyncpg.Pool, source: Source, *, chunk: int = CHUNK) -> None:
        self.config = config
        self.pool = pool
        self.chunk = chunk
        schema = config.database.state_schema
        self.sql = db.queries("reconcile", schema)
        self._chunk_sql = {has: source.reconcile_sql(schema, has_cursor_id=has) for has in (False, True)}
        self.unsubscribe = config.source.on_delete == "unsubscribe"

    async def step(self) -> Chunk | None:
        """The next chunk of the pass under way, or of a new one when due; None when no pass is
        due or another replica is doing a chunk."""
        async with self.pool.acquire() as conn, conn.transaction():
            place = await conn.fetchrow(self.sql["take"], self.config.source.reconcile_every)
            if place is None:
                return None
            after = place["after_id"]
            row = await conn.fetchrow(self._chunk_sql[after is not None], after, self.chunk, self.unsubscribe)
            finished = row["checked"] < self.chunk
            done = await conn.fetchrow(
                self.sql["advance"],
                place["started_at"],
                row["checked"],
                row["found"],
                None if finished else row["last_id"],
            )
        if row["found"]:
            logger.bind(users=row["found"], on_delete=self.config.source.on_delete).info(
                "reconcile: users the API holds whose row is deleted or filtered out"
            )
        if finished:
            logger.bind(
                checked=done["last_pass_checked"],
                found=done["last_pass_found"],
                seconds=round(done["last_pass_seconds"], 3),
            ).info("reconcile pass done")
        return Chunk(row["checked"], row["found"], finished)

    async def run_pass(self) -> int:
        """A whole pass now (due or not: tests, benchmarks): users found."""
        await self.pool.execute(self.sql["due_now"])
        found = 0
        while True:
            chunk = await self.step()
            if chunk is None:
                return found
            found += chunk.found
            if chunk.finished:
                return found


def check_every(every: float) -> float:
    """Seconds between looks for a due pass: a small share of `reconcile_every`."""
    return min(CHECK_EVERY_MAX, max(every / 10, 0.05))


async def run(reconciler: Reconciler, stop: asyncio.Event) -> None:
    """Passes every `source.reconcile_every` seconds until `stop`; chunks follow each other at
    once (each is short); a lost database is waited out (never fatal)."""
    every = reconciler.config.source.reconcile_every
    if every <= 0:
        await stop.wait()  # turned off
        return
    while not stop.is_set():
        chunk = await db.retrying(reconciler.step, what="reconcile", stop=stop)
        if chunk is not None and not chunk.finished:
            await asyncio.sleep(0)  # the next chunk; the loop stays responsive
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=check_every(every))
