"""The process's life end to end (G1, G3, G6, G8, G11): kill -9, SIGTERM, replicas, a backfill."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import Completions, assert_in_sync, fast, wait_in_sync

from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]


async def open_batches(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM usersync.batches WHERE status IN ('pending', 'claimed')"
        " AND cardinality(user_ids) > 0 GROUP BY status"
    )
    return {r["status"]: r["n"] for r in rows}


async def wait_no_open_batches(conn: asyncpg.Connection, timeout: float) -> None:
    """Until the ledger holds no open batch: one a dead process left mid-request is taken over
    only api.timeout after that request started (G6), then sent again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (held := await open_batches(conn)) != {}:
        if loop.time() > deadline:
            pytest.fail(f"batches still open after {timeout:g} s: {held}")
        await asyncio.sleep(0.1)


async def most_starts_in_a_window(conn: asyncpg.Connection, window: float) -> int:
    """The ledger's view of G1: the most request starts within any `window` seconds."""
    return await conn.fetchval(
        """
        SELECT coalesce(max(n), 0) FROM (
            SELECT count(*) OVER (
                ORDER BY started_at
                RANGE BETWEEN CURRENT ROW
                  AND make_interval(secs => $1) - interval '1 microsecond' FOLLOWING
            ) AS n
            FROM usersync.requests WHERE kind <> 'external'
        ) AS w
        """,
        window,
    )


async def test_kill_9_mid_run_loses_nothing(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """SIGKILL mid-run, then a restart: every user arrives, and the quota holds across both."""
    await seed(conn, 20_000)
    fake_api.limit_requests, fake_api.window = 10, 2.0
    # api.timeout 2 s: a batch killed mid-request is taken over 2 s after that request (G6)
    cfg = make_config(database_url, fake_api.url, api={"timeout": 2.0}, **fast(queue={"retry_after": 2.0}))
    first = await spawn(cfg)
    await fake_api.wait_for(lambda api: api.accepted >= 5, timeout=30)
    first.signal(signal.SIGKILL)
    assert await first.wait(timeout=5) == -signal.SIGKILL
    assert 5_000 <= len(fake_api.state) < 20_000
    held = await open_batches(conn)
    assert held.get("claimed", 0) >= 1  # the dead process held batches: they come back after their lease

    second = await spawn(cfg)
    await wait_in_sync(conn, fake_api, timeout=60)
    # the API may hold a killed batch's users already; the ledger closes it after its takeover
    await wait_no_open_batches(conn, timeout=30)
    assert await most_starts_in_a_window(conn, 2.0) <= 10  # the ledger outlived the process (G1)
    assert fake_api.violations == 0  # and the API agrees
    assert fake_api.concurrent_conflicts == 0
    assert await second.stop() == 0


async def test_batch_of_a_process_killed_while_forming_it_is_delivered(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """Users a killed process took into a batch before listing them there are still delivered."""
    await seed(conn, 200)
    cfg = make_config(database_url, fake_api.url, **fast())
    assert await (await spawn(cfg, "run", "--once")).wait(timeout=30) == 0
    assert len(fake_api.state) == 200
    # the state a kill -9 leaves between taking ready users (sync_state.batch_id) and recording
    # them in the batch (batches.user_ids): 100 changed users in a batch that lists none of them
    await conn.execute("UPDATE users SET name = 'changed', updated_at = clock_timestamp() WHERE id <= 100")
    async with conn.transaction():
        batch_id = await conn.fetchval(
            "INSERT INTO usersync.batches (queue, user_ids, status, claimed_by, lease_until)"
            " VALUES ('user-sync', '{}', 'claimed', 'vanished:1:dead/w0',"
            "         clock_timestamp() - interval '1 second')"
            " RETURNING id"
        )
        await conn.execute(
            "UPDATE usersync.sync_state s"
            " SET batch_id = $1, dirty = true, seen_updated_at = u.updated_at"
            " FROM users u WHERE u.id::text = s.user_id AND u.id <= 100",
            batch_id,
        )
    daemon = await spawn(cfg)
    await wait_in_sync(conn, fake_api, timeout=20)
    assert await daemon.stop() == 0
    assert (
        await conn.fetchval("SELECT count(*) FROM usersync.sync_state WHERE batch_id IS NOT NULL OR dirty")
        == 0
    )
    assert await conn.fetchval("SELECT status FROM usersync.batches WHERE id = $1", batch_id) == "done"


async def test_sigterm_lets_the_request_in_flight_finish(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """SIGTERM in 2 s requests (grace 5 s): they finish, none starts, exit 0; a restart finishes."""
    await seed(conn, 5000)
    fake_api.latency = 2.0
    cfg = make_config(database_url, fake_api.url, **fast(queue={"concurrency": 2, "shutdown_grace": 5.0}))
    daemon = await spawn(cfg)
    # both workers in flight: neither can start another request before the signal is handled
    await fake_api.wait_for(lambda api: api.stats()["in_flight"] >= 2, timeout=20)
    loop = asyncio.get_running_loop()
    in_flight = len(fake_api.requests)
    sent_at = loop.time()  # the fake stamps arrivals with time.monotonic(), as the loop does
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(timeout=10) == 0, daemon.text()[-3000:]
    took = loop.time() - sent_at
    # the requests in flight ended after at most 2 s; nothing waited for the 5 s grace
    assert took < 2.0 + 2.5, took
    assert len(fake_api.requests) == in_flight  # no request started after the signal
    assert all(r.status == 202 for r in fake_api.requests)
    assert all(r.arrived < sent_at for r in fake_api.requests)
    assert await open_batches(conn) == {}  # delivered in the grace: nothing to release
    delivered = len(fake_api.state)
    assert 0 < delivered < 5000

    fake_api.latency = 0.0
    restarted = await spawn(cfg)
    await wait_in_sync(conn, fake_api, timeout=30)
    assert await restarted.stop() == 0
    assert fake_api.concurrent_conflicts == 0
    assert set(fake_api.sends.values()) == {1}  # what was delivered before the stop was not sent again


async def test_sigterm_past_the_grace_releases_the_batch(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """SIGTERM, 5 s requests, 1 s grace: exit 0 after it, batches pending; a restart sends all."""
    await seed(conn, 2000)
    fake_api.latency = 5.0  # far from the grace: a loaded machine's slow exit is not a wait
    grace = 1.0
    cfg = make_config(
        database_url,
        fake_api.url,
        api={"timeout": 6.0},
        **fast(queue={"concurrency": 2, "shutdown_grace": grace}),
    )
    daemon = await spawn(cfg)
    await fake_api.wait_for(lambda api: api.stats()["in_flight"] >= 2, timeout=20)
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait(timeout=10) == 0, daemon.text()[-3000:]
    took = loop.time() - sent_at
    assert grace <= took < grace + 3.0, took
    assert len(fake_api.requests) == 2
    assert await open_batches(conn) == {"pending": 2}  # released for the next start
    assert any(e.get("message") == "usersyncd stopped" and e.get("released") == 2 for e in daemon.logs())

    fake_api.latency = 0.0
    restarted = await spawn(cfg)
    await wait_in_sync(conn, fake_api, timeout=30)
    await wait_no_open_batches(conn, timeout=10)  # the released batches are due after api.timeout
    assert await restarted.stop() == 0
    # they waited out the abandoned requests (api.timeout): no user was in two requests at once
    assert fake_api.concurrent_conflicts == 0
    assert len(fake_api.requests) == 2 + 2


async def test_two_processes_share_the_queue_and_the_quota(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """Two processes on one database: all delivered, no user in two requests at once, quota kept."""
    await seed(conn, 15_000)
    fake_api.limit_requests, fake_api.window = 10, 2.0
    fake_api.latency = 0.2
    completions = Completions(fake_api)
    cfg = make_config(database_url, fake_api.url, **fast())
    first, second = await spawn(cfg), await spawn(cfg)
    await fake_api.wait_for(lambda api: api.accepted >= 3, timeout=30)
    for round_ in range(3):  # users changed while both send: they go again, never twice at once
        await conn.execute(
            "UPDATE users SET name = $1, updated_at = clock_timestamp() WHERE id % 50 = $2",
            f"round {round_}",
            round_,
        )
        await asyncio.sleep(0.7)
    await wait_in_sync(conn, fake_api, timeout=60)
    assert fake_api.violations == 0
    assert fake_api.concurrent_conflicts == 0
    assert completions.overlaps() == []
    senders = await conn.fetchval("SELECT count(DISTINCT worker) FROM usersync.requests WHERE status = 202")
    assert senders == 2  # both processes did send
    assert await first.stop() == 0
    assert await second.stop() == 0
    await assert_in_sync(conn, fake_api)


async def test_live_changes_overtake_a_backfill(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """In a 10,000-user backfill, changed users go in the live lane within a poll and a slot."""
    await seed(conn, 10_000)
    fake_api.limit_requests, fake_api.window = 10, 2.0
    # 100 batches of 100 at 10 requests per 2.1 s: about 21 s. Small batches: what is measured
    # is the order and the pacing, not how fast a starved CPU validates 1,000 rows
    settings = fast(limits={"batch_size": 100})
    poll, span = (
        settings["source"]["poll_interval"],
        settings["limits"]["window"] + settings["limits"]["margin"],
    )
    daemon = await spawn(make_config(database_url, fake_api.url, **settings))
    await fake_api.wait_for(lambda api: api.accepted >= 20, timeout=30)  # just after a window's requests
    assert "user9990@example.com" not in fake_api.state

    loop = asyncio.get_running_loop()
    changed_at = loop.time()
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO users (id, email, name, time_zone) VALUES (100001, 'new@example.com', 'New', 'UTC')"
        )
        await conn.execute(
            "UPDATE users SET name = 'changed', updated_at = clock_timestamp() WHERE id = 9990"
        )
    await fake_api.wait_for(
        lambda api: (
            "new@example.com" in api.state
            and api.state.get("user9990@example.com", {}).get("name") == "changed"
        ),
        timeout=10,
    )
    carried = [r for r in fake_api.requests if r.status == 202 and "new@example.com" in r.emails]
    assert len(carried) == 1 and "user9990@example.com" in carried[0].emails
    delay = carried[0].arrived - changed_at
    assert delay < poll + span / 10 + 1.5, delay  # a poll, one quota slot, a tolerance
    assert len(fake_api.state) < 6_000  # long before the backfill ends

    lanes = await conn.fetch(
        "SELECT user_id, lane FROM usersync.sync_state WHERE user_id IN ('100001', '9990')"
    )
    assert {r["user_id"]: r["lane"] for r in lanes} == {"100001": 0, "9990": 0}
    batch = await conn.fetchrow("SELECT id, lane FROM usersync.batches WHERE '100001' = ANY(user_ids)")
    assert batch["lane"] == 0
    created = [
        e for e in daemon.logs() if e.get("message") == "batch created" and e.get("batch_id") == batch["id"]
    ]
    assert [e["lane"] for e in created] == ["live"]
    # no backfill batch was formed after the live users were staged and before theirs
    overtaken = await conn.fetchval(
        "SELECT count(*) FROM usersync.batches"
        " WHERE lane = 1 AND id < $1 AND cardinality(user_ids) > 0 AND created_at > ("
        "   SELECT max(dirty_since) FROM usersync.sync_state WHERE user_id IN ('100001', '9990'))",
        batch["id"],
    )
    assert overtaken == 0

    await fake_api.wait_for(lambda api: len(api.state) == 10_001, timeout=60)
    await assert_in_sync(conn, fake_api)
    assert fake_api.violations == 0
    assert (
        fake_api.sends["user9990@example.com"] == 1
    )  # sent once, changed: the backfill did not send it again
    assert await daemon.stop() == 0


async def test_live_change_waits_one_slot_not_a_window(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A change just after a window's requests went out arrives within a poll and one slot."""
    await seed(conn, 12_000)
    settings = fast(limits={"requests": 4, "window": 4.0, "margin": 0.1})  # one slot: 1.025 s
    slot = (4.0 + 0.1) / 4
    daemon = await spawn(make_config(database_url, fake_api.url, **settings))
    await fake_api.wait_for(lambda api: api.accepted >= 4, timeout=30)
    changed_at = asyncio.get_running_loop().time()
    await conn.execute(
        "INSERT INTO users (id, email, name, time_zone) VALUES (100001, 'new@example.com', 'New', 'UTC')"
    )
    await fake_api.wait_for(lambda api: "new@example.com" in api.state, timeout=20)
    carried = next(r for r in fake_api.requests if "new@example.com" in r.emails)
    assert await daemon.stop() == 0
    assert carried.arrived - changed_at < settings["source"]["poll_interval"] + slot + 1.5
