"""One batch through SyncUserBatch on a real PostgreSQL and the fake API on loopback: what a
reclaimed batch does before it waits for a slot, and what an error while preparing one costs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from usersyncd import api, db, source
from usersyncd.config import Config
from usersyncd.fakeapi import FakeApi
from usersyncd.queue import Queue, Sent
from usersyncd.quota import Quota
from usersyncd.worker import SyncUserBatch

pytestmark = pytest.mark.db

WINDOW = 30.0  # seconds: long, so that waiting for a slot shows as a timeout


@dataclass
class Bed:
    config: Config
    pool: asyncpg.Pool
    queue: Queue
    quota: Quota
    fake: FakeApi
    job: Callable[[], SyncUserBatch]


@pytest.fixture
async def bed(database_url: str, seed: Any) -> AsyncIterator[Bed]:
    fake = FakeApi(api_key="k")
    await fake.start()
    config = Config.model_validate(
        {
            "database": {"url": database_url},
            "api": {"url": fake.url, "key": "k"},
            "limits": {"requests": 5, "window": WINDOW, "margin": 0.1},
            "retry": {"attempts": 3, "backoff": 0.1},
            "source": {"fields": {"email": "email", "name": "name"}},
        }
    )
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    async with pool.acquire() as conn:
        await db.migrate(conn, "usersync")
        await seed(conn, 10)
        users = await source.inspect(conn, config.source)
    queue = Queue(pool, "usersync", "user-sync", worker="test/w0", lease=30.0)
    quota = Quota(
        pool,
        config.limits,
        "usersync",
        worker="test",
        credentials_probe_every=1.0,
        request_timeout=config.api.timeout,
    )
    client = api.ExternalUserApi(config.api)
    stop = asyncio.Event()

    def job() -> SyncUserBatch:
        return SyncUserBatch(
            config, pool=pool, source=users, queue=queue, quota=quota, client=client, stop=stop
        )

    try:
        yield Bed(config, pool, queue, quota, fake, job)
    finally:
        stop.set()
        await client.aclose()
        await pool.close()
        await fake.stop()


async def stage_batch(pool: asyncpg.Pool, user_ids: list[str], **batch: Any) -> int:
    """Users staged and held by one released batch (as a stopped worker leaves it)."""
    columns = ", ".join(["queue", "status", "user_ids", *batch])
    params = ", ".join(f"${n}" for n in range(1, 4 + len(batch)))
    batch_id = await pool.fetchval(
        f"INSERT INTO usersync.batches ({columns}) VALUES ({params}) RETURNING id",
        "user-sync",
        "pending",
        user_ids,
        *batch.values(),
    )
    await pool.execute(
        "INSERT INTO usersync.sync_state (user_id, seen_updated_at, dirty, batch_id, stage_seq)"
        " SELECT u, now(), true, $2, 1 FROM unnest($1::text[]) AS u",
        user_ids,
        batch_id,
    )
    return batch_id


async def test_reclaimed_batch_with_its_users_already_sent_waits_for_no_slot(bed: Bed) -> None:
    """A released batch whose users were all sent (sync_state no longer points at it) is done at
    once: no slot waited for while the quota is used up, none taken."""
    batch_id = await stage_batch(bed.pool, ["1", "2"])
    await bed.pool.execute("UPDATE usersync.sync_state SET batch_id = NULL, dirty = false")
    await bed.pool.execute(  # the whole quota is used: a slot would take a window
        "INSERT INTO usersync.requests (kind, worker) SELECT 'send', 'other' FROM generate_series(1, 5)"
    )
    batch = await bed.queue.claim_open_batch()
    assert batch is not None and batch.id == batch_id
    await asyncio.wait_for(bed.job().run(batch), timeout=WINDOW / 3)
    assert await bed.pool.fetchval("SELECT status FROM usersync.batches WHERE id = $1", batch_id) == "done"
    assert await bed.pool.fetchval("SELECT count(*) FROM usersync.requests") == 5
    assert bed.fake.requests == []


async def test_an_answer_recorded_after_a_takeover_leaves_the_batch_to_its_new_worker(bed: Bed) -> None:
    """G6, found by the chaos soak (tests/soak, seed 1275): worker A's request was accepted, then
    the database went away; A's lease ran out meanwhile, and B took the batch over and sent it
    again (a slow answer). A's bookkeeping, reaching the database now, must neither free the
    users (a change of one would go out in a second request while B's is in flight) nor finish
    the batch: both are B's, who sends and records them. (Before the fix both went through.)"""
    batch_id = await stage_batch(bed.pool, ["1", "2"])
    old = Queue(bed.pool, "usersync", "user-sync", worker="test/a", lease=30.0)
    new = Queue(bed.pool, "usersync", "user-sync", worker="test/b", lease=30.0)
    mine = await old.claim_open_batch()
    assert mine is not None and mine.id == batch_id
    await bed.pool.execute("UPDATE usersync.batches SET lease_until = clock_timestamp() - interval '1 s'")
    theirs = await new.claim_open_batch()
    assert theirs is not None and theirs.id == batch_id and await new.hold(theirs)

    sent = [
        Sent(u, b"h" + u.encode(), str(datetime.now(UTC)), 1, f"user{u}@example.com", None)
        for u in ("1", "2")
    ]
    await old.mark_sent(mine, sent)
    await old.finish(mine, "done")
    held = "SELECT count(*) FROM usersync.sync_state WHERE batch_id = $1"
    assert await bed.pool.fetchval(held, batch_id) == 2
    row = await bed.pool.fetchrow("SELECT status, claimed_by FROM usersync.batches WHERE id = $1", batch_id)
    assert (row["status"], row["claimed_by"]) == ("claimed", "test/b")

    await new.mark_sent(theirs, sent)
    await new.finish(theirs, "done")
    assert await bed.pool.fetchval(held, batch_id) == 0
    assert await bed.pool.fetchval("SELECT status FROM usersync.batches WHERE id = $1", batch_id) == "done"


async def test_an_abandoned_batch_waits_out_its_unanswered_request(bed: Bed) -> None:
    """G6, found by the chaos soak: worker A lost the database with a request of the batch in
    flight, and its lease ran out (queue.retry_after below api.timeout). B does not take the batch
    over until api.timeout after that request started; a recorded answer frees it at once."""
    batch_id = await stage_batch(bed.pool, ["1", "2"])
    await bed.pool.execute(
        "UPDATE usersync.batches SET status = 'claimed', claimed_by = 'test/a',"
        " lease_until = clock_timestamp() - interval '1 s'"
    )
    request_id = await bed.pool.fetchval(
        "INSERT INTO usersync.requests (kind, batch_id, attempt, users, worker, started_at)"
        " VALUES ('send', $1, 1, 2, 'test/a', clock_timestamp() - interval '1 s') RETURNING id",
        batch_id,
    )
    other = Queue(bed.pool, "usersync", "user-sync", worker="test/b", lease=3.0, request_timeout=5.0)
    assert not await other.has_work()
    assert await other.claim_open_batch() is None
    await bed.pool.execute("UPDATE usersync.requests SET started_at = clock_timestamp() - interval '6 s'")
    assert await other.has_work()
    taken = await other.claim_open_batch()
    assert taken is not None and taken.id == batch_id

    # answered: nothing is in flight, the batch is taken over as soon as its lease ran out
    await bed.pool.execute(
        "UPDATE usersync.batches SET claimed_by = 'test/a', lease_until = clock_timestamp() - interval '1 s';"
        " UPDATE usersync.requests SET started_at = clock_timestamp(), outcome = 'ok'"
    )
    assert request_id is not None and (await other.claim_open_batch()) is not None


async def test_reclaimed_batch_with_every_attempt_spent_is_dead_lettered_not_sent(bed: Bed) -> None:
    """A batch released after its last attempt (3 of 3, HTTP 503) is dead-lettered from that
    answer when reclaimed: no 4th request."""
    batch_id = await stage_batch(
        bed.pool, ["1", "2", "3"], attempts=3, last_status=503, last_error="HTTP 503"
    )
    batch = await bed.queue.claim_open_batch()
    assert batch is not None
    await asyncio.wait_for(bed.job().run(batch), timeout=10)
    assert bed.fake.requests == []
    row = await bed.pool.fetchrow("SELECT kind, user_ids, http_status, error FROM usersync.failures")
    assert (row["kind"], sorted(row["user_ids"]), row["http_status"]) == ("exhausted", ["1", "2", "3"], 503)
    assert row["error"] == "HTTP 503"
    assert await bed.pool.fetchval("SELECT status FROM usersync.batches WHERE id = $1", batch_id) == "failed"
    assert (
        await bed.pool.fetchval(
            "SELECT count(*) FROM usersync.sync_state WHERE dirty OR batch_id IS NOT NULL"
        )
        == 0
    )


async def test_batch_that_fails_to_prepare_is_dead_lettered_after_its_attempts(
    bed: Bed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """G14: an error confined to one batch (here its rows break the reading) spends retry.attempts
    attempts, then its users are dead-lettered (kind error) and the batch is never taken again;
    no slot is taken or left behind, nothing is sent."""
    await stage_batch(bed.pool, ["1", "2", "3"])

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the payload builder broke")

    batch = await bed.queue.claim_open_batch()
    assert batch is not None
    monkeypatch.setattr(source.Source, "fetch", broken)
    await asyncio.wait_for(bed.job().run(batch), timeout=10)

    row = await bed.pool.fetchrow("SELECT kind, user_ids, error FROM usersync.failures")
    assert (row["kind"], sorted(row["user_ids"])) == ("error", ["1", "2", "3"])
    assert "RuntimeError: the payload builder broke" in row["error"]
    done = await bed.pool.fetchrow(
        "SELECT status, attempts, last_kind FROM usersync.batches WHERE id = $1", batch.id
    )
    assert tuple(done) == ("failed", 3, "error")
    assert await bed.queue.claim_open_batch() is None
    assert await bed.pool.fetchval("SELECT count(*) FROM usersync.requests") == 0
    assert bed.fake.requests == []
