"""Single changes all through a wave (G11): each one waits about a poll and a slot, never for
the window to turn, while the wave drains at full quota."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import fast

from usersyncd.fakeapi import FakeApiProcess

pytestmark = [pytest.mark.e2e, pytest.mark.db]

WAVE = 12_000
SINGLES = 30


async def test_single_changes_during_a_wave_never_wait_for_the_window(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApiProcess,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A wave of 12,000 rows drains at 10 requests per 5.1 s; 30 other users change one after
    another during it: each arrives within a poll, two slots and a second (before, batches headed
    by a live user went ahead of the pace, filled the window in half of it, and the changes
    after that waited for it to turn: 2.5 s and more), and the quota is never exceeded."""
    await seed(conn, WAVE + SINGLES)
    settings = fast(limits={"requests": 10, "window": 5.0, "margin": 0.1}, source={"start_from": "now"})
    poll, slot = settings["source"]["poll_interval"], 5.1 / 10
    fake_api.limit_requests, fake_api.window = 10, 5.0
    daemon = await spawn(make_config(database_url, fake_api.url, **settings))
    await daemon.wait_for_log("usersyncd ready", timeout=30)
    await asyncio.sleep(4 * poll)
    await conn.execute(
        "UPDATE users SET name = name || ' (wave)', updated_at = clock_timestamp() WHERE id <= $1", WAVE
    )
    await fake_api.wait_for(lambda api: api.accepted >= 1, timeout=10)
    changed: dict[str, tuple[str, float]] = {}
    for user_id in range(WAVE + 1, WAVE + 1 + SINGLES):  # over about 6 s of the 12 s wave
        await asyncio.sleep(random.uniform(0.1, 0.3))
        name = f"single {user_id}"
        await conn.execute(
            "UPDATE users SET name = $2, updated_at = clock_timestamp() WHERE id = $1", user_id, name
        )
        changed[f"user{user_id}@example.com"] = (name, time.monotonic())
    await fake_api.wait_for(
        lambda api: all(api.state.get(e, {}).get("name") == n for e, (n, _) in changed.items()),
        timeout=30,
        interval=0.1,
    )
    arrived: dict[str, float] = {}
    for request in fake_api.requests:
        for sub in request.subscribers:
            email = sub["email"]
            if email in changed and email not in arrived and sub.get("name") == changed[email][0]:
                arrived[email] = request.arrived
    delays = sorted(arrived[email] - at for email, (_, at) in changed.items())
    # a batch is formed up to a slot before its slot frees (the former's lead): a change staged
    # just after that waits for the next batch, so a poll, two slots and a second of slack
    assert delays[-1] < poll + 2 * slot + 1.0, (delays[-5:], fake_api.stats())
    await fake_api.wait_for(lambda api: api.accepted >= WAVE // 1000, timeout=60, interval=0.2)
    assert await daemon.stop() == 0
    assert fake_api.violations == 0
