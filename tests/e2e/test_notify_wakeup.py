"""`source.notify_channel` end to end: with the trigger from `usersyncd trigger-sql` installed,
a change reaches the API long before the next poll would have read it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import fast

from usersyncd import cli
from usersyncd.fakeapi import FakeApiProcess

pytestmark = [pytest.mark.e2e, pytest.mark.db]

POLL = 30.0  # seconds: a change read by polling would wait about this long
WITHIN = 5.0  # seconds: a notified change arrives well before that (slack for a busy machine)


async def test_a_notified_change_arrives_long_before_the_next_poll(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApiProcess,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """poll_interval 30 s, the trigger installed: three changes, one after another, each
    arrives at the API within a few seconds, once."""
    await seed(conn, 10)
    settings = fast(source={"poll_interval": POLL, "notify_channel": "usersyncd_users", "start_from": "now"})
    config = make_config(database_url, fake_api.url, **settings)
    assert cli.main(["trigger-sql", "--config", str(config)]) == 0
    await conn.execute(capsys.readouterr().out)
    fake_api.limit_requests, fake_api.window = 10, 2.0
    daemon = await spawn(config)
    await daemon.wait_for_log("listening for changes", timeout=30)
    await daemon.wait_for_log("usersyncd ready", timeout=30)
    for user_id in (3, 7, 3):
        email = f"user{user_id}@example.com"
        name = f"changed at {time.monotonic()}"
        changed_at = time.monotonic()
        await conn.execute(
            "UPDATE users SET name = $2, updated_at = clock_timestamp() WHERE id = $1", user_id, name
        )
        await fake_api.wait_for(
            lambda api, email=email, name=name: api.state.get(email, {}).get("name") == name,
            timeout=POLL / 2,
        )
        carried = [r for r in fake_api.requests if r.arrived >= changed_at and email in r.emails]
        assert len(carried) == 1 and carried[0].arrived - changed_at < WITHIN, carried
    assert await daemon.stop() == 0
    assert fake_api.violations == 0
