"""The failures table on a real PostgreSQL: found by index at any size, resolved when every
user is settled (also by two batches finishing at once), pruned after the retention."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from usersyncd import db
from usersyncd.queue import Batch, Queue, Sent

pytestmark = pytest.mark.db

OPEN_FAILURES = 300_000
BATCH = 1_000


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    async with p.acquire() as conn:
        await db.migrate(conn, "usersync")
    yield p
    await p.close()


def queue(pool: asyncpg.Pool, worker: str = "test/w0") -> Queue:
    return Queue(pool, "usersync", "user-sync", worker=worker, lease=30.0)


async def hold(pool: asyncpg.Pool, user_ids: list[str], worker: str = "test/w0") -> Batch:
    """A batch claimed by `worker`, holding these (staged) users."""
    batch_id = await pool.fetchval(
        "INSERT INTO usersync.batches (queue, user_ids, claimed_by) VALUES ('user-sync', $1, $2) RETURNING id",
        user_ids,
        worker,
    )
    await pool.execute(
        "INSERT INTO usersync.sync_state AS s (user_id, seen_updated_at, batch_id, stage_seq)"
        " SELECT u, now(), $2, 1 FROM unnest($1::text[]) AS u"
        " ON CONFLICT (user_id) DO UPDATE SET batch_id = $2, dirty = true",
        user_ids,
        batch_id,
    )
    return Batch(batch_id, user_ids)


def sent(user_ids: list[str]) -> list[Sent]:
    return [Sent(u, b"h" + u.encode(), str(datetime.now(UTC)), 1, f"{u}@example.com", None) for u in user_ids]


async def test_marking_a_batch_sent_stays_fast_with_300000_open_failures(pool: asyncpg.Pool) -> None:
    """With 300,000 open failures, recording a 1,000-user batch as sent and resolving its users'
    failures uses the index, never a scan of `failures` (the plan, both plan modes), and takes
    under 0.5 s (best of 5: slack a loaded machine keeps; a scan per user would take seconds);
    dead-lettering 1,000 users stays under a second."""
    await pool.execute(
        "INSERT INTO usersync.failures (kind, user_ids, error, last_failed_at)"
        " SELECT 'invalid', ARRAY[g::text], 'bad', now() - interval '1 day'"
        " FROM generate_series(1, $1::int) AS g",
        OPEN_FAILURES,
    )
    await pool.execute(
        "INSERT INTO usersync.failure_users (user_id, failure_id)"
        " SELECT user_ids[1], id FROM usersync.failures"
    )
    await pool.execute("ANALYZE usersync.failures; ANALYZE usersync.failure_users")
    q = queue(pool)
    ids = [str(n) for n in range(1, BATCH + 1)]  # each has one open failure
    best = float("inf")
    for _ in range(5):
        await pool.execute(
            "UPDATE usersync.failures SET resolved_at = NULL, resolution = NULL WHERE resolved_at IS NOT NULL"
        )
        batch = await hold(pool, ids)
        began = time.perf_counter()
        await q.mark_sent(batch, sent(ids))
        resolved = await q.resolve_failures(ids)
        best = min(best, time.perf_counter() - began)
        assert resolved == BATCH
    assert best < 0.5, f"mark_sent + resolve_failures took {best * 1000:.0f} ms"
    assert await pool.fetchval("SELECT count(*) FROM usersync.failures WHERE resolved_at IS NULL") == (
        OPEN_FAILURES - BATCH
    )

    sql = db.queries("queue", "usersync")["resolve_failures"]
    async with pool.acquire() as conn:
        for mode in ("force_custom_plan", "force_generic_plan"):
            await conn.execute(f"SET plan_cache_mode = {mode}")
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", db.text_array(ids)))
            assert "Seq Scan on failures" not in plan, plan
            assert "failure_users" in plan, plan

    others = [str(n) for n in range(BATCH + 1, 2 * BATCH + 1)]
    began = time.perf_counter()
    await q.record_failure("exhausted", others, "HTTP 503", http_status=503)
    assert time.perf_counter() - began < 1.0


async def test_two_batches_finishing_at_once_resolve_their_shared_failure(pool: asyncpg.Pool) -> None:
    """A failure of users 1 and 2; user 1's batch and user 2's batch are marked sent at the same
    moment, each commit held back until both have looked: the failure is resolved."""
    q1, q2 = queue(pool, "test/w1"), queue(pool, "test/w2")
    first, second = await hold(pool, ["1"], "test/w1"), await hold(pool, ["2"], "test/w2")
    await q1.record_failure("rejected", ["1", "2"], "HTTP 422")
    # every commit that touches sync_state waits a moment: both transactions are open together
    await pool.execute(
        """
        CREATE FUNCTION public.slow_commit() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON usersync.sync_state
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.slow_commit();
        """
    )

    async def finish(q: Queue, batch: Batch) -> None:
        await q.mark_sent(batch, sent(batch.user_ids))
        await q.resolve_failures(batch.user_ids)

    await asyncio.gather(finish(q1, first), finish(q2, second))
    row = await pool.fetchrow("SELECT resolved_at, resolution FROM usersync.failures")
    assert row["resolved_at"] is not None and row["resolution"] == "synced"


async def test_resolved_failures_are_pruned_after_the_retention(pool: asyncpg.Pool) -> None:
    """prune(days) deletes failures resolved longer ago (and their index rows), keeps open and
    recent ones, and resolves an open failure whose users are all settled."""
    q = queue(pool)
    old = await q.record_failure("invalid", ["1"], "bad")
    recent = await q.record_failure("invalid", ["2"], "bad")
    still_open = await q.record_failure("invalid", ["3"], "bad")
    settled = await q.record_failure("rejected", ["4", "5"], "HTTP 422")
    await pool.execute(
        "UPDATE usersync.failures SET resolved_at = now() - interval '10 days', resolution = 'synced' WHERE id = $1",
        old,
    )
    await pool.execute(
        "UPDATE usersync.failures SET resolved_at = now() - interval '1 day', resolution = 'synced' WHERE id = $1",
        recent,
    )
    await pool.execute(
        "INSERT INTO usersync.sync_state (user_id, seen_updated_at, dirty, settled_at, settled)"
        " VALUES ('4', now(), false, clock_timestamp(), 'sent'), ('5', now(), false, clock_timestamp(), 'gone')"
    )
    await q.prune(7)
    rows = {r["id"]: r for r in await pool.fetch("SELECT id, resolved_at, resolution FROM usersync.failures")}
    assert set(rows) == {recent, still_open, settled}
    assert rows[still_open]["resolved_at"] is None
    assert rows[settled]["resolution"] == "synced"
    left = await pool.fetchval(
        "SELECT array_agg(DISTINCT failure_id ORDER BY failure_id) FROM usersync.failure_users"
    )
    assert left == sorted([recent, still_open, settled])
