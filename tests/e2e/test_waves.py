"""Live changes first, also behind a wave (G11), and rows with a NULL updated_at (G14), end to
end: the real process, a real PostgreSQL, the fake API on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import assert_in_sync, fast, wait_in_sync

from usersyncd import status
from usersyncd.config import load_config
from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]

SETTINGS = fast()  # 10 requests per 2.1 s window: one slot is 0.21 s
POLL = SETTINGS["source"]["poll_interval"]
SLOT = (SETTINGS["limits"]["window"] + SETTINGS["limits"]["margin"]) / SETTINGS["limits"]["requests"]
BOUND = POLL + SLOT + 1.0  # a poll, one quota slot, a second
STARTUP_LOOKBACK = 8.0


async def change_and_time(conn: asyncpg.Connection, api: FakeApi, user_id: int) -> float:
    """Change one user; seconds until the request carrying the change arrived at the API."""
    email = f"user{user_id}@example.com"
    changed_at = time.monotonic()
    await conn.execute(
        "UPDATE users SET name = 'changed', updated_at = clock_timestamp() WHERE id = $1", user_id
    )
    await api.wait_for(lambda a: a.state.get(email, {}).get("name") == "changed", timeout=30)
    carried = [r for r in api.requests if r.arrived >= changed_at and email in r.emails and r.status == 202]
    assert len(carried) == 1, len(carried)
    return carried[0].arrived - changed_at


@pytest.mark.parametrize("run", range(10))
async def test_a_change_just_after_a_first_start_within_lookback_goes_first(
    run: int,
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """30,000 users seeded just before the first start, inside the live lane's lookback, are
    the backfill's: one user changed after the start arrives within a poll and a slot (10 runs,
    fresh state each)."""
    await seed(conn, 30_000, updated_at="clock_timestamp()")
    fake_api.limit_requests, fake_api.window = 10, 2.0
    # a lookback a busy machine's start (imports, migrations: seconds) stays well within
    settings = fast(source={"lookback": STARTUP_LOOKBACK})
    daemon = await spawn(make_config(database_url, fake_api.url, **settings))
    await fake_api.wait_for(lambda api: api.accepted >= 1, timeout=30)  # the backfill is under way
    started = await conn.fetchval(
        "SELECT until_at - (SELECT max(updated_at) FROM users) FROM usersync.cursors WHERE lane = 'backfill'"
    )
    assert started.total_seconds() < STARTUP_LOOKBACK  # the first start, within lookback
    delay = await change_and_time(conn, fake_api, 30_000)
    assert delay < BOUND, (delay, fake_api.stats())
    lanes = await conn.fetchval(
        "SELECT count(*) FROM usersync.sync_state WHERE lane = 0 AND user_id <> '30000'"
    )
    assert lanes == 0  # no seeded row went to the live lane
    assert await daemon.stop() == 0
    assert fake_api.violations == 0


async def test_a_single_change_overtakes_a_wave_that_drains_at_full_quota(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A running daemon with nothing to send; one statement changes 20,000 users (a wave); one
    of them, still waiting at the tail of the wave, changes again: it arrives within a poll and
    a slot, once, with its latest data, while the wave drains one slot apart in full batches."""
    await seed(conn, 20_000)
    # a slot of 0.51 s: a busy machine prepares 1,000 users in less, so the quota is the limit
    settings = fast(limits={"requests": 10, "window": 5.0, "margin": 0.1}, source={"start_from": "now"})
    slot = (5.0 + 0.1) / 10
    fake_api.limit_requests, fake_api.window = 10, 5.0
    config = make_config(database_url, fake_api.url, **settings)
    daemon = await spawn(config)
    await daemon.wait_for_log("cursors created", timeout=30)
    await asyncio.sleep(4 * POLL)  # running, nothing to send: the users existed before it started
    assert not fake_api.requests

    wave_at = time.monotonic()
    await conn.execute("UPDATE users SET name = name || ' v2', updated_at = clock_timestamp()")
    await fake_api.wait_for(lambda api: api.accepted >= 2, timeout=10)  # the wave drains
    # and is staged whole, so the tail is the wave's (a change while it is still being staged is
    # the next poll's: test_source_and_poller's test of a change committed while a wave is staged)
    await daemon.wait_for_log("wave:", timeout=30)
    tail = await conn.fetchval(
        "SELECT user_id FROM usersync.sync_state WHERE dirty AND batch_id IS NULL"
        " ORDER BY lane DESC, dirty_since DESC, user_id DESC LIMIT 1"
    )
    delay = await change_and_time(conn, fake_api, int(tail))
    assert delay < POLL + slot + 1.0, (delay, fake_api.stats())
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    remaining = 20_000 - sum(len(r.subscribers) for r in fake_api.requests)
    assert remaining > 10_000, remaining  # it went ahead of most of the wave
    # status shows the lanes (in process: a second interpreter would slow the daemon down)
    shown = await status.collect(pool, load_config(config, environ={}), count_unstaged=False)
    assert 0 < shown.wave_ready <= shown.backfill_ready, shown
    assert f"wave {shown.wave_ready}" in status.render_text(shown)
    await pool.close()

    # a cheap wait: the fake API answers on this loop, and comparing 20,000 users would stall it
    await fake_api.wait_for(lambda api: api.accepted >= 20, timeout=60, interval=0.1)
    await asyncio.sleep(4 * POLL)
    await wait_in_sync(conn, fake_api, timeout=30)
    wave = [r for r in fake_api.requests if r.arrived >= wave_at]
    assert all(r.status == 202 for r in wave)
    assert sorted(len(r.subscribers) for r in wave)[1:] == [1000] * (len(wave) - 1)  # full batches
    assert len(wave) == 20  # 20,000 users, no request to spare
    # at full quota: one slot apart (paced), with a slack a busy machine keeps
    assert wave[-1].arrived - wave[0].arrived < (len(wave) - 1) * slot + 2.0
    assert set(fake_api.sends.values()) == {1}  # the tail user too: its latest data, once
    assert fake_api.state[f"user{tail}@example.com"]["name"] == "changed"
    assert fake_api.violations == 0
    assert await daemon.stop() == 0


async def test_rows_with_a_null_updated_at_reach_the_api(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """Rows whose updated_at is NULL are sent, those there at the start and one inserted later."""
    await seed(conn, 50)
    await conn.execute("ALTER TABLE users ALTER COLUMN updated_at DROP NOT NULL")
    await conn.execute("UPDATE users SET updated_at = NULL WHERE id % 5 = 0")
    fake_api.limit_requests, fake_api.window = 10, 2.0
    daemon = await spawn(make_config(database_url, fake_api.url, **SETTINGS))
    await wait_in_sync(conn, fake_api, timeout=30)
    await conn.execute(
        "INSERT INTO users (id, email, name, time_zone, updated_at)"
        " VALUES (51, 'user51@example.com', 'New', 'UTC', NULL)"
    )
    await fake_api.wait_for(lambda api: "user51@example.com" in api.state, timeout=10)
    await asyncio.sleep(5 * POLL)  # a few more sweeps: nothing is sent twice
    assert await daemon.stop() == 0
    await assert_in_sync(conn, fake_api)
    assert set(fake_api.sends.values()) == {1}
    assert fake_api.violations == 0
