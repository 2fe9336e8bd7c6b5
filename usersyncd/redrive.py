"""Redrives (G13): after a passing outage, users whose retries ran out go back to the queue by
themselves, `retry.redrive_after` seconds after they failed, at most `retry.redrives` times.

Only `exhausted` failures are redriven (a transient cause); invalid and rejected records never
are. Redriven users wait behind live and backfill users (lane 3) and are read afresh when their
batch forms, like every other user.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import asyncpg
from loguru import logger

from usersyncd import db
from usersyncd.config import RetryConfig

REDRIVE_LANE = 3  # sync_state.lane: after live (0), backfill (1) and waves (2)
PASS_LIMIT = 1000  # failures re-queued in one pass at most (one short transaction)
CHECK_EVERY_MAX = 60.0  # seconds between passes, at most


@dataclass(frozen=True)
class Redriven:
    failures: int  # failures whose users went back to the queue
    users: int
    most: int  # the highest redrive count among them


def check_every(retry: RetryConfig) -> float:
    """Seconds between passes: often enough that a due failure waits a small share of redrive_after."""
    return min(CHECK_EVERY_MAX, max(retry.redrive_after / 10, 0.05))


async def redrive_once(pool: asyncpg.Pool, schema: str, retry: RetryConfig) -> Redriven:
    """One pass: re-queue the users of due `exhausted` failures."""
    sql = db.queries("redrive", schema)
    row = await pool.fetchrow(sql["redrive"], retry.redrive_after, retry.redrives, PASS_LIMIT)
    done = Redriven(row["failures"], row["users"], row["most"])
    if done.users:
        logger.bind(failures=done.failures, users=done.users, redrive=done.most, limit=retry.redrives).info(
            "redrive: users whose retries ran out are queued again"
        )
    return done


async def run(pool: asyncpg.Pool, schema: str, retry: RetryConfig, stop: asyncio.Event) -> None:
    """Redrive due failures until `stop`; a lost database is waited out (never fatal)."""
    if retry.redrive_after <= 0 or retry.redrives <= 0:
        return await stop.wait()  # turned off
    every = check_every(retry)
    while not stop.is_set():
        done = await db.retrying(lambda: redrive_once(pool, schema, retry), what="redrive", stop=stop)
        if done.failures >= PASS_LIMIT:
            continue  # more are due: no pause
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
    return None


async def counts(pool: asyncpg.Pool, schema: str, failure_ids: list[int]) -> dict[int, int]:
    """{failure id: how often its users were redriven}, for `failed`."""
    if not failure_ids:
        return {}
    sql = db.queries("redrive", schema)
    return {r["id"]: r["redrives"] for r in await pool.fetch(sql["redrive_counts"], failure_ids)}
