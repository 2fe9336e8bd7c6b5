"""Redrives (G13) on a real PostgreSQL: exhausted failures go back to the queue by themselves,
at most `retry.redrives` times per user, behind live and backfill users; nothing else is redriven."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from usersyncd import db, redrive
from usersyncd.config import RetryConfig

pytestmark = pytest.mark.db

S = "usersync"
RETRY = RetryConfig(redrive_after=0.0, redrives=2)


@pytest.fixture
async def pool(database_url: str, conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    await db.migrate(conn, S)
    created = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    yield created
    await created.close()


async def users(conn: asyncpg.Connection, *ids: str) -> None:
    """Users that were taken into a batch and dropped from it unsent (what exhaustion leaves)."""
    await conn.executemany(
        f"INSERT INTO {S}.sync_state (user_id, seen_updated_at, dirty, lane) VALUES ($1, now(), false, 1)",
        [(i,) for i in ids],
    )


async def fail(conn: asyncpg.Connection, kind: str, *ids: str) -> int:
    failure_id = await conn.fetchval(
        f"INSERT INTO {S}.failures (kind, user_ids, error) VALUES ($1, $2, 'HTTP 503') RETURNING id",
        kind,
        list(ids),
    )
    await conn.executemany(
        f"INSERT INTO {S}.failure_users (user_id, failure_id) VALUES ($1, $2)", [(u, failure_id) for u in ids]
    )
    return failure_id


async def state(conn: asyncpg.Connection, user_id: str) -> asyncpg.Record:
    return await conn.fetchrow(
        f"SELECT dirty, lane, redrives FROM {S}.sync_state WHERE user_id = $1", user_id
    )


async def failure(conn: asyncpg.Connection, failure_id: int) -> asyncpg.Record:
    return await conn.fetchrow(
        f"SELECT user_ids, resolved_at, resolution FROM {S}.failures WHERE id = $1", failure_id
    )


async def test_exhausted_users_go_back_behind_everyone_else(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """An exhausted failure's users are dirty again in lane 3; invalid and rejected ones never are."""
    await users(conn, "a", "b", "c", "d")
    exhausted = await fail(conn, "exhausted", "a", "b")
    invalid = await fail(conn, "invalid", "c")
    rejected = await fail(conn, "rejected", "d")

    done = await redrive.redrive_once(pool, S, RETRY)

    assert (done.failures, done.users, done.most) == (1, 2, 1)
    for user in ("a", "b"):
        assert tuple(await state(conn, user)) == (True, redrive.REDRIVE_LANE, 1)
    for user in ("c", "d"):
        assert not (await state(conn, user))["dirty"]
    assert (await failure(conn, exhausted))["resolution"] == "redriven"
    assert (await failure(conn, invalid))["resolved_at"] is None
    assert (await failure(conn, rejected))["resolved_at"] is None


async def test_redrives_stop_at_the_limit(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """Failing again after each redrive: redriven `redrives` times, then the failure stays open."""
    await users(conn, "a")
    for expected in (1, 2):
        await conn.execute(f"UPDATE {S}.sync_state SET dirty = false")
        await fail(conn, "exhausted", "a")
        assert (await redrive.redrive_once(pool, S, RETRY)).users == 1
        assert (await state(conn, "a"))["redrives"] == expected
    await conn.execute(f"UPDATE {S}.sync_state SET dirty = false")
    last = await fail(conn, "exhausted", "a")
    assert (await redrive.redrive_once(pool, S, RETRY)).users == 0
    assert (await failure(conn, last))["resolved_at"] is None  # for an operator now
    assert not (await state(conn, "a"))["dirty"]
    assert await redrive.counts(pool, S, [last]) == {last: 2}


async def test_a_user_sent_since_gets_its_redrives_back(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """A success after a redrive starts the count again: a later outage gets its redrives too."""
    await users(conn, "a")
    await conn.execute(f"UPDATE {S}.sync_state SET redrives = 2, redriven_at = now() - interval '1 hour'")
    await conn.execute(f"UPDATE {S}.sync_state SET sent_at = now()")
    await fail(conn, "exhausted", "a")
    assert (await redrive.redrive_once(pool, S, RETRY)).users == 1
    assert (await state(conn, "a"))["redrives"] == 1


async def test_a_user_out_of_redrives_keeps_its_failure(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """Of a failure's two users, the one with redrives left goes back; the other stays in it (G3)."""
    await users(conn, "a", "b")
    await conn.execute(f"UPDATE {S}.sync_state SET redrives = 2, redriven_at = now() WHERE user_id = 'b'")
    both = await fail(conn, "exhausted", "a", "b")
    assert (await redrive.redrive_once(pool, S, RETRY)).users == 1
    row = await failure(conn, both)
    assert row["resolved_at"] is None and list(row["user_ids"]) == ["b"]
    indexed = await conn.fetch(f"SELECT user_id FROM {S}.failure_users WHERE failure_id = $1", both)
    assert [r["user_id"] for r in indexed] == ["b"]
    assert (await state(conn, "a"))["dirty"] and not (await state(conn, "b"))["dirty"]


async def test_not_before_redrive_after(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """A failure younger than redrive_after waits."""
    await users(conn, "a")
    await fail(conn, "exhausted", "a")
    assert (await redrive.redrive_once(pool, S, RetryConfig(redrive_after=3600.0, redrives=3))).users == 0
    assert not (await state(conn, "a"))["dirty"]


async def test_failed_shows_redrives_and_the_next_one(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str
) -> None:
    """`usersyncd failed` lists an exhausted failure with its redrive count and when the next comes."""
    from usersyncd import cli, failures
    from usersyncd.config import Config

    await users(conn, "a", "b")
    await conn.execute(f"UPDATE {S}.sync_state SET redrives = 1, redriven_at = now() WHERE user_id = 'a'")
    await conn.execute(f"UPDATE {S}.sync_state SET redrives = 3, redriven_at = now() WHERE user_id = 'b'")
    await fail(conn, "exhausted", "a")
    await fail(conn, "exhausted", "b")
    cfg = Config.model_validate(
        {"database": {"url": database_url}, "api": {"url": "http://127.0.0.1:9"}, "retry": {"redrives": 3}}
    )
    text = failures.render_failures(await cli._open_failures(pool, cfg))
    first, second = text.splitlines()[1:]
    assert "[redriven 1x; next " in first
    assert "[redriven 3x; no more: replay-failed when fixed]" in second
