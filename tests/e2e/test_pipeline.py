"""The sync pipeline end to end: the real process, a real PostgreSQL, the fake API on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import assert_in_sync, fast, wait_in_sync

from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]


async def test_drain_20000_users(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """20,000 users drain with `run --once`: the API equals the table; invalid users are in failures."""
    await seed(conn, 20_000, invalid_email_every=97, invalid_time_zone_every=101)
    fake_api.limit_requests, fake_api.window = 10, 2.0
    daemon = await spawn(make_config(database_url, fake_api.url, **fast()), "run", "--once")
    assert await daemon.wait(timeout=60) == 0, daemon.text()[-3000:]
    await assert_in_sync(conn, fake_api)
    assert fake_api.violations == 0
    # every request but the last is full (invalid rows are left out, the batch topped up)
    sizes = [len(r.subscribers) for r in fake_api.requests]
    assert sorted(sizes)[1:] == [1000] * (len(sizes) - 1) or sizes.count(1000) >= len(sizes) - 2
    reasons = await conn.fetch(
        "SELECT field, error FROM usersync.failures WHERE kind = 'invalid' AND resolved_at IS NULL"
    )
    assert {r["field"] for r in reasons} == {"email", "time_zone"}
    assert any("Mars/Olympus_Mons" in r["error"] for r in reasons)


async def test_changes_during_run_are_coalesced_and_noops_cost_nothing(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """Updates while running arrive; 5 updates while waiting are sent once; an updated_at bump sends nothing."""
    await seed(conn, 200)
    daemon = await spawn(make_config(database_url, fake_api.url, **fast()))
    await fake_api.wait_for(lambda api: len(api.state) == 200, timeout=30)
    assert fake_api.sends["user7@example.com"] == 1

    # a 429 pauses all sending for 1.5 s; user 7 changes 5 times meanwhile
    fake_api.script(429, headers={"Retry-After": "1.5"})
    await conn.execute("UPDATE users SET name = 'trigger', updated_at = clock_timestamp() WHERE id = 1")
    await fake_api.wait_for(lambda api: any(r.status == 429 for r in api.requests), timeout=10)
    for n in range(5):
        await conn.execute("UPDATE users SET name = $1, updated_at = clock_timestamp() WHERE id = 7", f"v{n}")
        await asyncio.sleep(0.05)
    await fake_api.wait_for(lambda api: api.state["user7@example.com"]["name"] == "v4", timeout=15)
    await asyncio.sleep(1.0)  # a few more polls: nothing else may go out for user 7
    assert fake_api.sends["user7@example.com"] == 2
    assert fake_api.state["user1@example.com"]["name"] == "trigger"

    # only updated_at moves: the content hash is unchanged, no request
    requests_before = len(fake_api.requests)
    await conn.execute("UPDATE users SET updated_at = clock_timestamp() WHERE id = 9")
    bumped = await conn.fetchval("SELECT updated_at FROM users WHERE id = 9")
    for _ in range(100):
        row = await conn.fetchrow(
            "SELECT seen_updated_at, dirty, batch_id FROM usersync.sync_state WHERE user_id = '9'"
        )
        if row["seen_updated_at"] == bumped and not row["dirty"] and row["batch_id"] is None:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the bump was never processed")
    assert fake_api.sends["user9@example.com"] == 1
    assert len(fake_api.requests) == requests_before

    # a field cleared in the table is cleared at the API
    await conn.execute("UPDATE users SET name = NULL, updated_at = clock_timestamp() WHERE id = 11")
    await fake_api.wait_for(lambda api: api.state["user11@example.com"]["name"] is None, timeout=10)
    assert await daemon.stop() == 0
    await assert_in_sync(conn, fake_api)


async def test_late_commit_within_lookback_arrives(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A transaction that commits after newer rows were synced, with an older updated_at, still arrives."""
    await seed(conn, 50)
    daemon = await spawn(make_config(database_url, fake_api.url, **fast()))
    await fake_api.wait_for(lambda api: len(api.state) == 50, timeout=30)

    late = await asyncpg.connect(database_url)
    try:
        tx = late.transaction()
        await tx.start()
        await late.execute("UPDATE users SET name = 'late', updated_at = clock_timestamp() WHERE id = 5")
        await asyncio.sleep(0.6)  # longer than a poll
        await conn.execute("UPDATE users SET name = 'newer', updated_at = clock_timestamp() WHERE id = 6")
        await fake_api.wait_for(lambda api: api.state["user6@example.com"]["name"] == "newer", timeout=10)
        cursor = await conn.fetchval("SELECT updated_at FROM usersync.cursors WHERE lane = 'live'")
        late_stamp = await late.fetchval("SELECT updated_at FROM users WHERE id = 5")
        assert late_stamp < cursor  # the cursor has passed the uncommitted row
        await tx.commit()
    finally:
        await late.close()
    await fake_api.wait_for(lambda api: api.state["user5@example.com"]["name"] == "late", timeout=10)
    assert await daemon.stop() == 0
    await wait_in_sync(conn, fake_api, timeout=5)


async def test_updated_at_moving_backwards_is_still_synced(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A row whose updated_at goes backwards (clock skew, a late commit) is sent again, once,
    and no empty batches spin while its old updated_at is still ahead."""
    await seed(conn, 20)
    daemon = await spawn(make_config(database_url, fake_api.url, **fast()))
    await fake_api.wait_for(lambda api: len(api.state) == 20, timeout=30)
    await conn.execute(
        "UPDATE users SET name = 'v1', updated_at = clock_timestamp() + interval '5 minutes' WHERE id = 3"
    )
    await fake_api.wait_for(lambda api: api.state["user3@example.com"]["name"] == "v1", timeout=10)
    await conn.execute("UPDATE users SET name = 'v2', updated_at = clock_timestamp() WHERE id = 3")
    await fake_api.wait_for(lambda api: api.state["user3@example.com"]["name"] == "v2", timeout=10)
    batches = await conn.fetchval("SELECT count(*) FROM usersync.batches")
    await asyncio.sleep(1.0)  # five polls
    rows = await conn.fetch("SELECT id, status, user_ids, lane, created_at FROM usersync.batches ORDER BY id")
    assert len(rows) - batches <= 1, [dict(r) for r in rows]
    assert fake_api.sends["user3@example.com"] == 3
    assert await daemon.stop() == 0
    await assert_in_sync(conn, fake_api)


async def test_bulk_touch_where_few_rows_changed_still_sends_full_batches(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """G2/G4: a job touches updated_at of 20,000 synced rows and really changes 1 % of them. The
    200 changed users go in batches filled up to batch_size (100), not in a trickle of nearly
    empty ones; the 19,800 unchanged users are not sent again."""
    await seed(conn, 20_000)
    drain = await spawn(make_config(database_url, fake_api.url, **fast()), "run", "--once")
    assert await drain.wait(timeout=60) == 0, drain.text()[-3000:]
    assert len(fake_api.state) == 20_000
    before = len(fake_api.requests)

    await conn.execute(
        "UPDATE users SET updated_at = clock_timestamp(),"
        " name = CASE WHEN id % 100 = 0 THEN 'changed' ELSE name END"
    )
    daemon = await spawn(make_config(database_url, fake_api.url, **fast(limits={"batch_size": 100})))
    changed = {f"user{n}@example.com" for n in range(100, 20_001, 100)}
    await fake_api.wait_for(lambda api: all(api.state[e]["name"] == "changed" for e in changed), timeout=60)
    await asyncio.sleep(1.0)  # whatever else would go out, has
    sizes = [len(r.subscribers) for r in fake_api.requests[before:]]
    assert len(sizes) <= 6, sizes  # 2 at best; nearly empty batches would take about 20
    assert sum(sizes) == 200
    assert all(fake_api.sends[e] == 2 for e in changed)
    assert sum(fake_api.sends.values()) == 20_000 + 200
    assert await daemon.stop() == 0
