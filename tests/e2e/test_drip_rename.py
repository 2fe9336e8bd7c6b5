"""Renamed emails and removed tags against the Drip-flavoured fake, on the real process (SPEC
G12): the API keeps one subscriber per user, under its current email; a swap of two users'
emails overwrites nobody (both renames are refused, each user dead-lettered with Drip's reason,
the rest delivered); a tag dropped from the array column leaves the subscriber."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import drip_api, fast, speak_drip

from usersyncd.fakeapi import FakeApiProcess

pytestmark = [pytest.mark.e2e, pytest.mark.db]

USERS = 2000
RENAMED = range(40, USERS + 1, 40)  # 50 users get a new email
SWAPPED = (1001, 1002)  # these two swap theirs
UNTAGGED = range(1, 101)  # these lose the "customer" tag


async def test_renames_swap_and_removed_tags(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApiProcess,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    speak_drip(fake_api)
    fake_api.limit_requests = 50
    await seed(conn, USERS)
    await conn.execute("ALTER TABLE users ADD COLUMN tags text[]")
    await conn.execute("UPDATE users SET tags = ARRAY['customer', 'plan' || id % 3]")
    config = make_config(
        database_url,
        fake_api.url,
        **fast(
            api=drip_api(fake_api),
            source={
                "fields": {"email": "email", "first_name": "name", "time_zone": "time_zone", "tags": "tags"}
            },
            limits={"requests": 50, "window": 2.0, "margin": 0.1},
        ),
    )
    daemon = await spawn(config)
    await fake_api.wait_for(lambda api: len(api.state) == USERS, timeout=60)
    before = {email: dict(sub) for email, sub in fake_api.state.items()}

    async with conn.transaction():
        await conn.execute(
            "UPDATE users SET email = 'renamed' || id || '@example.com', updated_at = clock_timestamp()"
            " WHERE id = ANY($1::bigint[])",
            list(RENAMED),
        )
        await conn.execute(
            "UPDATE users SET email = CASE id WHEN $1 THEN $4 ELSE $3 END, updated_at = clock_timestamp()"
            " WHERE id IN ($1, $2)",
            *SWAPPED,
            *(f"user{i}@example.com" for i in SWAPPED),
        )
        await conn.execute(
            "UPDATE users SET tags = array_remove(tags, 'customer'), updated_at = clock_timestamp()"
            " WHERE id = ANY($1::bigint[])",
            list(UNTAGGED),
        )
    renamed = {f"renamed{i}@example.com" for i in RENAMED}

    def email_of(i: int) -> str:
        return f"renamed{i}@example.com" if i in RENAMED else f"user{i}@example.com"

    def state_of(i: int) -> dict[str, Any]:
        return fake_api.state.get(email_of(i), {})

    async def settled() -> list[asyncpg.Record]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            failures = await conn.fetch(
                "SELECT kind, user_ids, http_status, error FROM usersync.failures WHERE resolved_at IS NULL"
            )
            untagged = all("customer" not in state_of(i).get("tags", ["customer"]) for i in UNTAGGED)
            if renamed <= set(fake_api.state) and len(failures) == 2 and untagged:
                return failures
            await asyncio.sleep(0.2)
        pytest.fail(f"not settled: {fake_api.stats()}, failures {failures}")

    failures = await settled()
    assert await daemon.stop() == 0

    state = fake_api.state
    assert len(state) == USERS  # one subscriber per user: no second one behind a rename
    assert not {f"user{i}@example.com" for i in RENAMED} & set(state)  # none under an old email
    for i in RENAMED:
        sub = state[f"renamed{i}@example.com"]
        assert sub["first_name"] == f"User {i}" and ("customer" in sub["tags"]) == (i not in UNTAGGED)
    # the swap: both renames refused whole by Drip, pinned by isolation; nobody overwritten
    assert sorted(u for f in failures for u in f["user_ids"]) == [str(i) for i in SWAPPED]
    assert {(f["kind"], f["http_status"]) for f in failures} == {("rejected", 422)}
    assert all("New email has already been taken" in f["error"] for f in failures)
    for i in SWAPPED:
        assert state[f"user{i}@example.com"] == before[f"user{i}@example.com"]
    # removed tags left the subscribers; the others kept theirs
    for i in UNTAGGED:
        assert state[email_of(i)]["tags"] == [f"plan{i % 3}"], state[email_of(i)]
    assert state["user500@example.com"]["tags"] == ["customer", "plan2"]
    assert fake_api.violations == 0
    created = [e for e in daemon.logs() if e.get("message") == "batch created"]
    assert sum(e.get("renames", 0) for e in created) >= len(RENAMED) + len(SWAPPED)


async def test_users_sent_before_emails_were_kept_are_renamed_not_doubled(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApiProcess,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """Users accepted by a version that kept only their hash (no sent_email, as before migration
    0010): at start the email of every user whose row still hashes to what was sent is recovered
    (one changed since stays unknown); a later email change goes as a rename, so the API keeps
    one subscriber, under the new email."""
    speak_drip(fake_api)
    await seed(conn, 50)
    config = make_config(
        database_url,
        fake_api.url,
        **fast(api=drip_api(fake_api)),
    )
    synced = await spawn(config, "run", "--once")
    assert await synced.wait(timeout=60) == 0, synced.text()[-2000:]
    assert len(fake_api.state) == 50
    await conn.execute("UPDATE usersync.sync_state SET sent_email = NULL, sent_tags = NULL")
    # changed with no new updated_at: its row no longer hashes to what was sent
    await conn.execute("UPDATE users SET name = 'Changed' WHERE id = 3")

    daemon = await spawn(config)
    deadline = time.monotonic() + 30
    while not (
        found := [e for e in daemon.logs() if e.get("message", "").startswith("emails the API holds")]
    ):
        assert time.monotonic() < deadline, daemon.text()[-2000:]
        await asyncio.sleep(0.1)
    assert (found[0]["users"], found[0]["recovered"], found[0]["unknown"]) == (50, 49, 1)
    unknown = await conn.fetch("SELECT user_id FROM usersync.sync_state WHERE sent_email IS NULL")
    assert [r["user_id"] for r in unknown] == ["3"]

    await conn.execute(
        "UPDATE users SET email = 'user7.new@example.com', updated_at = clock_timestamp() WHERE id = 7"
    )
    await fake_api.wait_for(lambda api: "user7.new@example.com" in api.state, timeout=30)
    assert "user7@example.com" not in fake_api.state  # renamed, not a second subscriber
    assert len(fake_api.state) == 50
    assert await daemon.stop() == 0
