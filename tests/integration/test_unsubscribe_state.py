"""Deletions and rows leaving the filter (G12) on a real PostgreSQL: the reconciliation pass
(bounded chunks, an anti-join with the filter), the poller seeing rows updated out of the
filter, and unsubscribe batches apart from subscribe batches, through the Drip-flavoured fake."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from usersyncd import api, db, poller, reconcile, records, recover, source, status
from usersyncd.config import Config
from usersyncd.fakeapi import FakeApi
from usersyncd.queue import Queue
from usersyncd.quota import Quota
from usersyncd.worker import SyncUserBatch

pytestmark = pytest.mark.db

S = "usersync"
ACCOUNT = "1234567"
USERS = 25


def make_config(database_url: str, api_url: str = "http://127.0.0.1:9", **source_keys: Any) -> Config:
    return Config.model_validate(
        {
            "database": {"url": database_url},
            "api": {
                "url": api_url,
                "key": "k",
                "auth": "basic",
                "account_id": ACCOUNT,
                "batch_path": "/v2/{account_id}/subscribers/batches",
                "unsubscribe_path": "/v2/{account_id}/unsubscribes/batches",
            },
            "source": {"filter": "active", "fields": {"email": "email", "name": "name"}, **source_keys},
            "limits": {"requests": 50, "window": 10.0, "margin": 0.1},
            "retry": {"attempts": 2, "backoff": 0.1},
        }
    )


@pytest.fixture
async def pool(database_url: str, conn: asyncpg.Connection, seed: Any) -> AsyncIterator[asyncpg.Pool]:
    """USERS users, each sent before (the API holds its email), with an `active` filter column."""
    await db.migrate(conn, S)
    await seed(conn, USERS)
    await conn.execute("ALTER TABLE users ADD COLUMN active boolean NOT NULL DEFAULT true")
    await conn.execute(
        f"INSERT INTO {S}.sync_state (user_id, seen_updated_at, dirty, sent_hash, sent_email, sent_at)"
        " SELECT id::text, updated_at, false, '\\x00', email, now() FROM users"
    )
    created = await asyncpg.create_pool(database_url, min_size=1, max_size=6)
    yield created
    await created.close()


async def states(conn: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch(f"SELECT user_id, gone, dirty, lane FROM {S}.sync_state")
    return {r["user_id"]: r for r in rows}


async def reconciler(conn: asyncpg.Connection, config: Config, chunk: int) -> reconcile.Reconciler:
    src = await source.inspect(conn, config.source)
    pool = await asyncpg.create_pool(config.database.url, min_size=1, max_size=2)
    return reconcile.Reconciler(config, pool, src, chunk=chunk)


@pytest.mark.parametrize("on_delete", ["unsubscribe", "ignore"])
async def test_reconcile_pass_walks_in_bounded_chunks_and_finds_rows_gone_or_filtered_out(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str, on_delete: str
) -> None:
    """A pass checks every user of sync_state, at most `chunk` per transaction, and marks gone
    exactly the users the API holds whose row is deleted or fails the filter (untouched rows
    included): not the unsubscribed, not the never sent, not those waiting anyway. With
    "unsubscribe" they wait (paced lane); with "ignore" they are only marked, for status."""
    await conn.execute("DELETE FROM users WHERE id IN (3, 11, 20, 21, 22)")
    await conn.execute("UPDATE users SET active = false WHERE id IN (5, 17)")  # updated_at unchanged
    await conn.execute(f"UPDATE {S}.sync_state SET unsubscribed_at = now() WHERE user_id = '21'")
    await conn.execute(f"UPDATE {S}.sync_state SET sent_email = NULL, sent_hash = NULL WHERE user_id = '22'")
    await conn.execute(f"UPDATE {S}.sync_state SET dirty = true WHERE user_id = '20'")
    config = make_config(database_url, on_delete=on_delete, reconcile_every=3600.0)
    rec = await reconciler(conn, config, chunk=4)
    try:
        assert await rec.step() is None  # the first pass is due reconcile_every after the migration
        await rec.pool.execute(rec.sql["due_now"])
        chunks = []
        while (chunk := await rec.step()) is not None:
            chunks.append(chunk)
            if chunk.finished:
                break
        assert all(c.checked <= 4 for c in chunks)
        assert sum(c.checked for c in chunks) == USERS
        assert len(chunks) == math.ceil((USERS + 1) / 4)
        assert await rec.step() is None  # the next pass is due in an hour
        found = {u for u, s in (await states(conn)).items() if s["gone"]}
        assert found == {"3", "5", "11", "17"}
        for user in found:
            state = (await states(conn))[user]
            assert (state["dirty"], state["lane"]) == (
                (True, 1) if on_delete == "unsubscribe" else (False, 0)
            )
        row = await conn.fetchrow(f"SELECT * FROM {S}.reconcile")
        assert (row["last_pass_checked"], row["last_pass_found"], row["pass_started_at"]) == (USERS, 4, None)
        assert await rec.run_pass() == 0  # found once: nothing new the second time
    finally:
        await rec.pool.close()


async def test_poller_stages_a_row_updated_out_of_the_filter_at_once(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str
) -> None:
    """A known user's row updated to fail the filter is staged gone by the next poll; an unknown
    one failing the filter is not staged at all; a row passing again is no longer gone."""
    config = make_config(database_url, on_delete="unsubscribe", lookback=0.0)
    src = await source.inspect(conn, config.source)
    service = poller.UserSyncService(config, pool, src, work_ready=asyncio.Event())
    await service.init_cursors()
    await conn.execute(
        "INSERT INTO users (id, email, name, time_zone, active) VALUES (99, 'new@example.com', 'N', 'UTC', false)"
    )
    await conn.execute("UPDATE users SET active = false, updated_at = clock_timestamp() WHERE id = 7")
    await service.poll_once()
    now = await states(conn)
    assert "99" not in now
    assert (now["7"]["gone"], now["7"]["dirty"], now["7"]["lane"]) == (True, True, poller.LIVE)
    assert sum(s["gone"] for s in now.values()) == 1
    await conn.execute(f"UPDATE {S}.sync_state SET dirty = false WHERE user_id = '7'")
    await conn.execute("UPDATE users SET active = true, updated_at = clock_timestamp() WHERE id = 7")
    await service.poll_once()
    assert ((await states(conn))["7"]["gone"], (await states(conn))["7"]["dirty"]) == (False, True)


async def test_gone_users_go_in_unsubscribe_batches_and_come_back_active(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str
) -> None:
    """Ready users, some gone: a request carries only subscribes or only unsubscribes (to their
    own paths), the gone ones are unsubscribed under the email the API holds; a row that comes
    back is subscribed again with "status": "active"; every request went through the ledger."""
    fake = FakeApi(
        api_key="k", auth="basic", flavour="drip", account_id=ACCOUNT, limit_requests=50, window=10.0
    )
    await fake.start()
    config = make_config(database_url, fake.url, on_delete="unsubscribe")
    src = await source.inspect(conn, config.source)
    queue = Queue(pool, S, "user-sync", worker="test/w0", lease=30.0)
    quota = Quota(
        pool, config.limits, S, worker="test", credentials_probe_every=1.0, request_timeout=config.api.timeout
    )
    client = api.ExternalUserApi(config.api)
    stop = asyncio.Event()

    async def drain() -> None:
        while await queue.has_work():
            await SyncUserBatch(
                config, pool=pool, source=src, queue=queue, quota=quota, client=client, stop=stop
            ).run(None)

    try:
        for i in range(1, USERS + 1):  # the API holds every user already
            fake.state[f"user{i}@example.com"] = {"email": f"user{i}@example.com", "status": "active"}
        await conn.execute(f"UPDATE {S}.sync_state SET sent_hash = NULL, dirty = true")  # all to send
        await conn.execute(f"UPDATE {S}.sync_state SET gone = true WHERE user_id IN ('4', '9')")
        await conn.execute("DELETE FROM users WHERE id IN (4, 9, 13)")  # 13: found in a subscribe batch
        await conn.execute("UPDATE users SET email = 'changed13@example.com' WHERE id = 12")
        await drain()
        paths = [r.path for r in fake.requests]
        unsubs = [r for r in fake.requests if r.path.endswith("/unsubscribes/batches")]
        assert len(unsubs) >= 1 and len(paths) - len(unsubs) >= 1
        assert sorted(e for r in unsubs for e in r.emails) == [
            "user13@example.com",
            "user4@example.com",
            "user9@example.com",
        ]
        subscribed = {e for r in fake.requests if r not in unsubs for e in r.emails}
        assert subscribed.isdisjoint({"user4@example.com", "user9@example.com", "user13@example.com"})
        assert {fake.state[f"user{i}@example.com"]["status"] for i in (4, 9, 13)} == {"unsubscribed"}
        assert await conn.fetchval(f"SELECT count(*) FROM {S}.requests") == len(fake.requests)
        rows = await conn.fetch(
            f"SELECT gone, unsubscribed_at IS NOT NULL AS unsubscribed, sent_hash, dirty FROM {S}.sync_state"
            " WHERE user_id IN ('4', '9', '13')"
        )
        assert all(
            r["gone"] and r["unsubscribed"] and r["sent_hash"] is None and not r["dirty"] for r in rows
        )

        before = len(fake.requests)
        await conn.execute(
            "INSERT INTO users (id, email, name, time_zone) VALUES (9, 'user9@example.com', 'Back', 'UTC')"
        )
        await conn.execute(f"UPDATE {S}.sync_state SET dirty = true WHERE user_id = '9'")  # as a poll would
        await drain()
        back = [s for r in fake.requests[before:] for s in r.subscribers]
        assert back == [{"email": "user9@example.com", "name": "Back", "status": "active"}]
        assert fake.state["user9@example.com"]["status"] == "active"
        row = await conn.fetchrow(f"SELECT gone, unsubscribed_at FROM {S}.sync_state WHERE user_id = '9'")
        assert (row["gone"], row["unsubscribed_at"]) == (False, None)
        assert fake.violations == 0 and fake.concurrent_conflicts == 0
    finally:
        stop.set()
        await client.aclose()
        await fake.stop()


async def test_status_counts_gone_users_with_on_delete_ignore(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str
) -> None:
    """With "ignore" nothing waits to be sent for a deleted user, and `status` counts it, with
    the last pass; an unsubscribed user is not counted (the API no longer holds it)."""
    await conn.execute("DELETE FROM users WHERE id IN (2, 4, 6)")
    await conn.execute(f"UPDATE {S}.sync_state SET unsubscribed_at = now() WHERE user_id = '6'")
    config = make_config(database_url, on_delete="ignore")
    rec = await reconciler(conn, config, chunk=10)
    try:
        assert await rec.run_pass() == 2
    finally:
        await rec.pool.close()
    snapshot = await status.collect(pool, config)
    assert (snapshot.gone, snapshot.live_ready + snapshot.backfill_ready) == (2, 0)
    line = next(x for x in status.render_text(snapshot).splitlines() if x.startswith("gone:"))
    assert "2 left subscribed at the API (on_delete = ignore)" in line
    assert f"{USERS} users checked" in line and "2 found" in line


async def test_a_bulk_update_out_of_the_filter_is_a_wave(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str
) -> None:
    """More rows updated out of the filter in one poll than the live lane takes in (a batch per
    slot) go to the paced lane, like any wave: a single change after them still goes first (G11)."""
    config = make_config(database_url, on_delete="unsubscribe", lookback=0.0)
    config = config.model_copy(update={"limits": config.limits.model_copy(update={"batch_size": 10})})
    src = await source.inspect(conn, config.source)
    service = poller.UserSyncService(config, pool, src, work_ready=asyncio.Event())
    await service.init_cursors()
    await conn.execute("UPDATE users SET active = false, updated_at = clock_timestamp() WHERE id <= 20")
    result = await service.poll_once()
    assert (result.staged, result.wave, result.live_staged) == (20, 20, 0)
    lanes = await conn.fetch(f"SELECT DISTINCT lane FROM {S}.sync_state WHERE gone")
    assert [r["lane"] for r in lanes] == [poller.PACED]


async def test_recovery_fills_the_emails_of_users_sent_before_they_were_kept(
    pool: asyncpg.Pool, conn: asyncpg.Connection, database_url: str
) -> None:
    """Users with a hash and no sent_email (sent before migration 0010): in chunks, each whose
    row still hashes to sent_hash gets its row's email; a changed row, a deleted one and a hash
    that matches nothing stay unknown; a second walk finds nothing more."""
    config = make_config(database_url)
    src = await source.inspect(conn, config.source)
    rows = await src.fetch(conn, [str(i) for i in range(1, 21)])
    for user_id, row in rows.items():
        payload = records.validate(user_id, row.values, config.source.fields)
        assert not isinstance(payload, records.Invalid)
        await conn.execute(
            f"UPDATE {S}.sync_state SET sent_hash = $2 WHERE user_id = $1",
            user_id,
            records.content_hash(payload),
        )
    await conn.execute(f"UPDATE {S}.sync_state SET sent_email = NULL")  # 21-25 keep a hash of nothing
    await conn.execute("UPDATE users SET name = 'Changed' WHERE id = 4")
    await conn.execute("DELETE FROM users WHERE id = 6")
    recovery = recover.Recovery(config, pool, src, chunk=4)
    assert await recovery.run(asyncio.Event()) == 18
    emails = {r["user_id"]: r["sent_email"] for r in await conn.fetch(f"SELECT * FROM {S}.sync_state")}
    assert {u for u, e in emails.items() if e is None} == {"4", "6", "21", "22", "23", "24", "25"}
    assert all(e == f"user{u}@example.com" for u, e in emails.items() if e is not None)
    assert await recovery.run(asyncio.Event()) == 0
