"""Shared assertions and settings for end-to-end tests."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import asyncpg

from usersyncd import seed
from usersyncd.fakeapi import FakeApiProcess

# A compressed world: 10 requests per 2 s window; everything else scaled to match.
FAST: dict[str, dict[str, Any]] = {
    "limits": {"requests": 10, "window": 2.0, "margin": 0.1},
    "source": {"poll_interval": 0.2, "lookback": 3.0},
    "retry": {"attempts": 3, "backoff": 0.3},
    "queue": {"retry_after": 5.0, "shutdown_grace": 5.0, "concurrency": 4},
    "log": {"level": "DEBUG", "format": "json"},
}


DRIP_ACCOUNT = "1234567"


def speak_drip(api: FakeApiProcess) -> None:
    """The fake answers as Drip does: its paths for DRIP_ACCOUNT, basic auth."""
    api.flavour, api.auth, api.account_id = "drip", "basic", DRIP_ACCOUNT


def drip_api(api: FakeApiProcess, **keys: Any) -> dict[str, Any]:
    """The `api` section of a config for the Drip-speaking fake (`speak_drip`)."""
    return {
        "url": api.url,
        "key": "test-key",
        "auth": "basic",
        "account_id": DRIP_ACCOUNT,
        "batch_path": "/v2/{account_id}/subscribers/batches",
        **keys,
    }


def fast(**overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """FAST with some sections' keys replaced."""
    merged = {section: dict(values) for section, values in FAST.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return merged


async def open_failure_users(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT unnest(user_ids) AS u FROM usersync.failures WHERE resolved_at IS NULL")
    return {r["u"] for r in rows}


async def assert_in_sync(conn: asyncpg.Connection, api: FakeApiProcess) -> None:
    """G3: every valid user's latest state is at the API; every invalid one has an open failure."""
    valid, invalid = await seed.expected_state(conn)
    wrong = seed.mismatches(api.state, valid)  # one read: each one asks the fake whether anything changed
    assert not wrong, f"{len(wrong)} users differ, e.g. {list(wrong.items())[:3]}"
    missing = invalid - await open_failure_users(conn)
    assert not missing, f"invalid users without an open failure: {sorted(missing)[:5]}"


async def wait_in_sync(conn: asyncpg.Connection, api: FakeApiProcess, timeout: float) -> None:
    """Poll until assert_in_sync holds, or raise its last AssertionError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        began = loop.time()
        try:
            await assert_in_sync(conn, api)
            return
        except AssertionError:
            if loop.time() > deadline:
                raise
        # comparing a big table takes a while: leave the (two) cores to the daemon most of the time
        await asyncio.sleep(max(0.1, 2 * (loop.time() - began)))


class Completions:
    """When each request to the fake ended, to find overlapping requests (the fake records it)."""

    def __init__(self, api: FakeApiProcess) -> None:
        self.api = api

    def overlaps(self) -> list[tuple[int, int, list[str]]]:
        """(i, j, shared emails) for every two requests that carried a user while both were open."""
        reqs = self.api.requests  # in arrival order
        found = []
        for i, first in enumerate(reqs):
            end = float("inf") if first.ended is None else first.ended
            emails = set(first.emails)
            for j in range(i + 1, len(reqs)):
                if reqs[j].arrived >= end:
                    break
                shared = emails.intersection(reqs[j].emails)
                if shared:
                    found.append((i, j, sorted(shared)[:3]))
        return found


async def usersyncd(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a `usersyncd` operator command to completion (in a thread: the test's loop keeps running)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "usersyncd", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
