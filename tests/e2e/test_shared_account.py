"""A shared account (SPEC §2, issue 7 item 12): another client steadily uses half of the quota.

The fake API counts every arrival, ours and the other client's, and answers with
X-RateLimit-Remaining. The daemon must leave the other client its half for the whole run: the
budget it learns is kept until a response shows more room, not forgotten a window later.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from helpers import assert_in_sync, fast

from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]

LIMIT, WINDOW, MARGIN = 10, 2.0, 0.1


async def other_client(url: str, every: float, stop: asyncio.Event) -> int:
    """Another client of the account: one request, then `every` seconds after its answer the
    next (its arrivals are never closer than `every`: at most WINDOW / every in any window)."""
    sent = 0
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer test-key"}) as client:
        while not stop.is_set():
            body = {"batches": [{"subscribers": [{"email": f"other-{sent}@example.com"}]}]}
            await client.post("/subscribers/batches", json=body)
            sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
    return sent


async def test_another_client_using_half_the_account_is_left_its_half(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """60 requests' worth of backlog beside a client using 5 of 10 per window: about fifteen
    windows with no request over the limit and no 429, and the daemon uses the rest but one
    (the guard for the phase of the other client's requests)."""
    await seed(conn, 6_000)
    fake_api.limit_requests, fake_api.window = LIMIT, WINDOW
    fake_api.rate_limit_remaining_header = True
    stop = asyncio.Event()
    other = asyncio.ensure_future(other_client(fake_api.url, WINDOW / (LIMIT // 2), stop))
    try:
        await asyncio.sleep(WINDOW)  # the other client is in its stride before the daemon starts
        config = make_config(
            database_url,
            fake_api.url,
            **fast(
                limits={"requests": LIMIT, "window": WINDOW, "margin": MARGIN, "batch_size": 100},
                queue={"concurrency": 2},
            ),
        )
        began = time.monotonic()
        daemon = await spawn(config, "run", "--once")
        assert await daemon.wait(timeout=120) == 0, daemon.text()[-3000:]
        elapsed = time.monotonic() - began
    finally:
        stop.set()
        sent = await other
    ours = [r for r in fake_api.requests if r.headers.get("user-agent", "").startswith("usersyncd/")]
    statuses = [r.status for r in fake_api.requests]
    learnt = [r["others"] for r in await conn.fetch("SELECT others FROM usersync.requests ORDER BY id")]
    assert fake_api.violations == 0, (fake_api.violations, fake_api.max_in_window, learnt)
    assert 429 not in statuses, learnt
    # the other client kept using about half (a loaded machine may slow it, never speed it up)
    assert len(ours) == 60 and sent >= 0.5 * (LIMIT // 2) * elapsed / WINDOW, (len(ours), sent, elapsed)
    assert fake_api.max_arrivals_in_any_window(WINDOW) <= LIMIT
    # the rest of the account, used: 60 requests at 4 per span take about 15 spans; never 20
    span = WINDOW + MARGIN
    arrived = sorted(r.arrived for r in ours)
    assert arrived[-1] - arrived[0] <= 20 * span, arrived[-1] - arrived[0]
    await assert_in_sync(conn, fake_api)
