"""Shared assertions and settings for end-to-end tests."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from usersyncd import records
from usersyncd.fakeapi import FakeApi

FIELDS = {"email": "email", "name": "name", "time_zone": "time_zone"}

# A compressed world: 10 requests per 2 s window; everything else scaled to match.
FAST: dict[str, dict[str, Any]] = {
    "limits": {"requests": 10, "window": 2.0, "margin": 0.1},
    "source": {"poll_interval": 0.2, "lookback": 3.0},
    "retry": {"attempts": 3, "backoff": 0.3},
    "queue": {"retry_after": 5.0, "shutdown_grace": 5.0, "concurrency": 4},
    "log": {"level": "DEBUG", "format": "json"},
}


def fast(**overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """FAST with some sections' keys replaced."""
    merged = {section: dict(values) for section, values in FAST.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return merged


async def expected_state(conn: asyncpg.Connection) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """What the API should hold for each valid user (by email), and the ids of invalid ones."""
    valid: dict[str, dict[str, Any]] = {}
    invalid: set[str] = set()
    for row in await conn.fetch("SELECT id::text AS id, email, name, time_zone FROM users"):
        result = records.validate(row["id"], dict(row), FIELDS)
        if isinstance(result, records.Invalid):
            invalid.add(row["id"])
        else:
            valid[result["email"]] = result
    return valid, invalid


async def open_failure_users(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT unnest(user_ids) AS u FROM usersync.failures WHERE resolved_at IS NULL")
    return {r["u"] for r in rows}


async def assert_in_sync(conn: asyncpg.Connection, api: FakeApi) -> None:
    """G3: every valid user's latest state is at the API; every invalid one has an open failure."""
    valid, invalid = await expected_state(conn)
    wrong = {email: (api.state.get(email), want) for email, want in valid.items() if api.state.get(email) != want}
    assert not wrong, f"{len(wrong)} users differ, e.g. {list(wrong.items())[:3]}"
    missing = invalid - await open_failure_users(conn)
    assert not missing, f"invalid users without an open failure: {sorted(missing)[:5]}"


async def wait_in_sync(conn: asyncpg.Connection, api: FakeApi, timeout: float) -> None:
    """Poll until assert_in_sync holds, or raise its last AssertionError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await assert_in_sync(conn, api)
            return
        except AssertionError:
            if loop.time() > deadline:
                raise
        await asyncio.sleep(0.1)
