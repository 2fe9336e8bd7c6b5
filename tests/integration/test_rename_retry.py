"""Renames (SPEC G12) through SyncUserBatch on a real PostgreSQL and the Drip-flavoured fake:
a rename that lands but whose answer is lost (the client times out, the fake applies it after)
is sent again and lands once; no second subscriber, no failure, even when the row's email
changed once more before the retry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from usersyncd import api, db, source
from usersyncd.config import Config
from usersyncd.fakeapi import FakeApi
from usersyncd.queue import Queue
from usersyncd.quota import Quota
from usersyncd.worker import SyncUserBatch

pytestmark = pytest.mark.db

ACCOUNT = "1234567"
TIMEOUT = 0.3  # api.timeout, seconds
HELD = 1.0  # the fake holds the lost request this long, then applies it
BACKOFF = 1.5  # the retry comes after the lost request was applied (no concurrent update)


@dataclass
class Bed:
    pool: asyncpg.Pool
    fake: FakeApi
    job: Callable[[], SyncUserBatch]


@pytest.fixture
async def bed(database_url: str, seed: Any) -> AsyncIterator[Bed]:
    fake = FakeApi(api_key="k", auth="basic", flavour="drip", account_id=ACCOUNT)
    await fake.start()
    config = Config.model_validate(
        {
            "database": {"url": database_url},
            "api": {
                "url": fake.url,
                "key": "k",
                "auth": "basic",
                "account_id": ACCOUNT,
                "batch_path": "/v2/{account_id}/subscribers/batches",
                "unsubscribe_path": "/v2/{account_id}/unsubscribes/batches",
                "timeout": TIMEOUT,
            },
            "limits": {"requests": 50, "window": 2.0, "margin": 0.1},
            "retry": {"attempts": 3, "backoff": BACKOFF},
            "source": {"fields": {"email": "email", "first_name": "name"}, "on_delete": "unsubscribe"},
        }
    )
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    async with pool.acquire() as conn:
        await db.migrate(conn, "usersync")
        await seed(conn, 3)
        users = await source.inspect(conn, config.source)
    await stage(pool, ["1", "2", "3"])
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
        await asyncio.wait_for(job().run(None), timeout=10)  # everyone sent once
        assert set(fake.state) == {"user1@example.com", "user2@example.com", "user3@example.com"}
        yield Bed(pool, fake, job)
    finally:
        stop.set()
        await client.aclose()
        await pool.close()
        await fake.stop()


async def stage(pool: asyncpg.Pool, user_ids: list[str]) -> None:
    """What the poller does for changed rows: dirty, staged once more."""
    await pool.execute(
        "INSERT INTO usersync.sync_state (user_id, seen_updated_at, dirty, stage_seq)"
        " SELECT u, now(), true, 1 FROM unnest($1::text[]) AS u"
        " ON CONFLICT (user_id) DO UPDATE SET dirty = true, stage_seq = usersync.sync_state.stage_seq + 1",
        user_ids,
    )


async def change_email(pool: asyncpg.Pool, user_id: str, email: str) -> None:
    await pool.execute(
        "UPDATE users SET email = $2, updated_at = clock_timestamp() WHERE id = $1", int(user_id), email
    )
    await stage(pool, [user_id])


async def send_with_lost_answer(bed: Bed, between: Callable[[], Any] | None = None) -> None:
    """One batch whose first request lands after the client gave up on it; `between` runs
    while that request is held."""
    bed.fake.latency = HELD
    before = len(bed.fake.requests)
    run = asyncio.ensure_future(bed.job().run(None))
    await bed.fake.wait_for(lambda fake: len(fake.requests) > before, timeout=10)
    bed.fake.latency = 0.0
    if between is not None:
        await between()
    await asyncio.wait_for(run, timeout=15)


async def state_of(pool: asyncpg.Pool, user_id: str) -> tuple[Any, ...]:
    row = await pool.fetchrow(
        "SELECT sent_email, pending_email, dirty FROM usersync.sync_state WHERE user_id = $1", user_id
    )
    return tuple(row)


async def test_a_rename_landed_unanswered_is_sent_again_and_lands_once(bed: Bed) -> None:
    await change_email(bed.pool, "1", "new1@example.com")
    await send_with_lost_answer(bed)
    bodies = [r.subscribers for r in bed.fake.requests[-2:]]
    rename = {"email": "user1@example.com", "new_email": "new1@example.com", "first_name": "User 1"}
    assert bodies == [[rename], [rename]]  # sent twice, the first unanswered
    assert [r.status for r in bed.fake.requests[-2:]] == [201, 201]
    assert set(bed.fake.state) == {"new1@example.com", "user2@example.com", "user3@example.com"}
    assert await state_of(bed.pool, "1") == ("new1@example.com", None, False)
    assert await bed.pool.fetchval("SELECT count(*) FROM usersync.failures") == 0


async def test_a_third_email_before_the_retry_finishes_the_lost_rename_first(bed: Bed) -> None:
    """The API holds user1@ or new1@ (nobody knows): the retry renames to new1@, then the user
    goes once more, new1@ -> third1@; at no point a second subscriber."""
    await change_email(bed.pool, "1", "new1@example.com")
    await send_with_lost_answer(bed, lambda: change_email(bed.pool, "1", "third1@example.com"))
    assert await state_of(bed.pool, "1") == ("new1@example.com", None, True)  # goes once more
    await asyncio.wait_for(bed.job().run(None), timeout=10)
    assert [r.subscribers for r in bed.fake.requests[-1:]] == [
        [{"email": "new1@example.com", "new_email": "third1@example.com", "first_name": "User 1"}]
    ]
    assert set(bed.fake.state) == {"third1@example.com", "user2@example.com", "user3@example.com"}
    assert await state_of(bed.pool, "1") == ("third1@example.com", None, False)
    assert await bed.pool.fetchval("SELECT count(*) FROM usersync.failures") == 0


async def test_a_refused_swap_overwrites_nobody_and_leaves_no_pending_rename(bed: Bed) -> None:
    """Users 1 and 2 swap emails: Drip refuses the batch whole, isolation pins both, the rest is
    delivered; the refusal proves neither rename landed, so user 1 put back to its email is
    unchanged (its failure resolves), not renamed from the other's subscriber."""
    before = {email: dict(sub) for email, sub in bed.fake.state.items()}
    await bed.pool.execute(
        "UPDATE users SET email = CASE id WHEN 1 THEN 'user2@example.com' ELSE 'user1@example.com' END,"
        " name = name || ' (swapped)', updated_at = clock_timestamp() WHERE id IN (1, 2)"
    )
    await bed.pool.execute(
        "UPDATE users SET name = 'User 3 again', updated_at = clock_timestamp() WHERE id = 3"
    )
    await stage(bed.pool, ["1", "2", "3"])
    await asyncio.wait_for(bed.job().run(None), timeout=15)
    failures = await bed.pool.fetch(
        "SELECT kind, user_ids, http_status, error FROM usersync.failures ORDER BY id"
    )
    assert sorted(u for f in failures for u in f["user_ids"]) == ["1", "2"]
    assert all(f["kind"] == "rejected" and f["http_status"] == 422 for f in failures)
    assert all("New email has already been taken" in f["error"] for f in failures)
    assert bed.fake.state["user1@example.com"] == before["user1@example.com"]  # nobody overwritten
    assert bed.fake.state["user2@example.com"] == before["user2@example.com"]
    assert bed.fake.state["user3@example.com"]["first_name"] == "User 3 again"  # the rest delivered
    assert await state_of(bed.pool, "1") == ("user1@example.com", None, False)
    assert await state_of(bed.pool, "2") == ("user2@example.com", None, False)

    await bed.pool.execute(
        "UPDATE users SET email = 'user1@example.com', name = 'User 1', updated_at = clock_timestamp() WHERE id = 1"
    )
    await stage(bed.pool, ["1"])
    sent = len(bed.fake.requests)
    await asyncio.wait_for(bed.job().run(None), timeout=10)
    assert len(bed.fake.requests) == sent  # the API has it already
    resolved = await bed.pool.fetchval(
        "SELECT resolution FROM usersync.failures WHERE user_ids = '{1}' AND resolved_at IS NOT NULL"
    )
    assert resolved == "unchanged"


async def test_a_user_deleted_after_an_unanswered_rename_is_unsubscribed_under_both_emails(bed: Bed) -> None:
    """The API holds user1@ or new1@ (the rename's answer was lost) when the row is deleted:
    the unsubscribe names both, so whichever it holds leaves (G12)."""

    async def delete() -> None:
        await bed.pool.execute("DELETE FROM users WHERE id = 1")
        await stage(bed.pool, ["1"])

    await change_email(bed.pool, "1", "new1@example.com")
    await send_with_lost_answer(bed, delete)  # the retry finds the row gone: an unsubscribe's
    assert (await state_of(bed.pool, "1"))[1] == "new1@example.com"  # still unknown which one
    await asyncio.wait_for(bed.job().run(None), timeout=10)
    last = bed.fake.requests[-1]
    assert last.path.endswith("/unsubscribes/batches")
    assert sorted(s["email"] for s in last.subscribers) == ["new1@example.com", "user1@example.com"]
    assert bed.fake.state["new1@example.com"]["status"] == "unsubscribed"
    assert "user1@example.com" not in bed.fake.state  # renamed by the lost request: one subscriber
    assert await bed.pool.fetchval("SELECT count(*) FROM usersync.failures") == 0
