"""G13 end to end: after a fault storm ends, every valid user reaches the API with no operator action."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import fast, wait_in_sync

from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]


async def test_fault_storm_then_clean_api_leaves_nobody_behind(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """500s until every batch's retries run out, then a clean API: redrives deliver everyone; no
    open `exhausted` failure is left, invalid users keep theirs, the quota holds."""
    await seed(conn, 4000, invalid_email_every=500)
    fake_api.limit_requests, fake_api.window = 10, 2.0
    fake_api.script(500, times=8)  # 4 batches x 2 attempts: every first batch is exhausted
    config = make_config(
        database_url,
        fake_api.url,
        **fast(retry={"attempts": 2, "backoff": 0.1, "redrive_after": 1.0, "redrives": 3}),
    )
    daemon = await spawn(config)
    await wait_in_sync(conn, fake_api, timeout=90)
    assert await daemon.stop() == 0

    assert [r.status for r in fake_api.requests[:8]] == [500] * 8
    exhausted_open = await conn.fetchval(
        "SELECT count(*) FROM usersync.failures WHERE kind = 'exhausted' AND resolved_at IS NULL"
    )
    redriven = await conn.fetchval("SELECT count(*) FROM usersync.failures WHERE resolution = 'redriven'")
    assert exhausted_open == 0 and redriven >= 1
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM usersync.failures WHERE kind = 'invalid' AND resolved_at IS NULL"
        )
        == 8
    )
    assert fake_api.violations == 0
    assert "redrive: users whose retries ran out are queued again" in daemon.text()
