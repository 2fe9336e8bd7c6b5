"""Dead letters and what an operator does with them (G5, G7): failed, replay-failed, forget-failed, history."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import assert_in_sync, fast, usersyncd

from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]


async def run_once(spawn: Any, config: Path) -> None:
    daemon = await spawn(config, "run", "--once")
    assert await daemon.wait(timeout=60) == 0, daemon.text()[-3000:]


async def open_failures(config: Path) -> list[dict[str, Any]]:
    result = await usersyncd("failed", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_invalid_records_are_dead_lettered_and_resolve_when_fixed(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """Invalid users never reach the API; fixing a row resolves its failure by itself; a replay of a
    still-invalid user says it failed again."""
    await seed(conn, 100, invalid_email_every=20)
    config = make_config(database_url, fake_api.url, **fast())
    await run_once(spawn, config)
    failures = await open_failures(config)
    assert sorted(f["user_ids"][0] for f in failures) == ["100", "20", "40", "60", "80"]
    assert all(f["kind"] == "invalid" and f["field"] == "email" for f in failures)
    assert not any(email.startswith("not-an-email") for email in fake_api.state)
    assert len(fake_api.state) == 95  # the rest of each batch was sent

    await conn.execute(
        "UPDATE users SET email = 'fixed20@example.com', updated_at = clock_timestamp() WHERE id = 20"
    )
    forty = next(f["id"] for f in failures if f["user_ids"] == ["40"])
    replay = await usersyncd("replay-failed", "--config", str(config), "--id", str(forty))
    assert replay.returncode == 0 and "re-queued 1 user(s) from 1 failure(s)" in replay.stdout
    assert "no usersyncd process is running" in replay.stdout
    await run_once(spawn, config)

    assert fake_api.state["fixed20@example.com"]["name"] == "User 20"
    resolved = await conn.fetchrow(
        "SELECT resolved_at, resolution FROM usersync.failures WHERE user_ids = '{20}'"
    )
    assert resolved["resolved_at"] is not None and resolved["resolution"] == "synced"
    again = await conn.fetchrow(
        "SELECT resolved_at, replayed_at, replay_outcome FROM usersync.failures WHERE id = $1",
        forty,
    )
    assert (
        again["resolved_at"] is None
        and again["replayed_at"] is not None
        and again["replay_outcome"] == "failed again"
    )
    await assert_in_sync(conn, fake_api)


async def test_rejected_users_are_replayed_once_even_by_two_replays_at_once(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A 422 naming two records dead-letters those two; two concurrent replays re-queue them once;
    they are sent with their current data and the failures are marked synced."""
    await seed(conn, 50)
    fake_api.reject_emails = {"user7@example.com", "user8@example.com"}
    config = make_config(database_url, fake_api.url, **fast())
    await run_once(spawn, config)
    failures = await open_failures(config)
    assert len(failures) == 1 and failures[0]["kind"] == "rejected" and failures[0]["http_status"] == 422
    assert sorted(failures[0]["user_ids"]) == ["7", "8"]
    assert len(fake_api.state) == 48

    fake_api.reject_emails = set()
    await conn.execute("UPDATE users SET name = 'Seven, now' WHERE id = 7")  # changed, updated_at untouched
    first, second = await asyncio.gather(
        usersyncd("replay-failed", "--config", str(config), "--all"),
        usersyncd("replay-failed", "--config", str(config), "--all"),
    )
    counts = sorted(int(r.stdout.split("re-queued ")[1].split(" ")[0]) for r in (first, second))
    assert counts == [0, 2]
    await run_once(spawn, config)
    assert fake_api.sends["user7@example.com"] == 1 and fake_api.sends["user8@example.com"] == 1
    assert fake_api.state["user7@example.com"]["name"] == "Seven, now"  # current data, not the failed payload
    row = await conn.fetchrow("SELECT resolution, replay_outcome, replayed_at FROM usersync.failures")
    assert (
        row["resolution"] == "synced" and row["replay_outcome"] == "synced" and row["replayed_at"] is not None
    )
    assert await open_failures(config) == []


async def test_forget_failed_and_history(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """forget-failed drops what it is told (an unknown id is an error); history lists the requests."""
    await seed(conn, 30, invalid_time_zone_every=10)
    config = make_config(database_url, fake_api.url, **fast())
    await run_once(spawn, config)
    ids = [f["id"] for f in await open_failures(config)]
    assert len(ids) == 3
    forgot = await usersyncd("forget-failed", "--config", str(config), str(ids[0]), "999999")
    assert forgot.returncode == 1
    assert "forgot 1 failure(s)" in forgot.stdout and "no failure with id 999999" in forgot.stderr
    assert [f["id"] for f in await open_failures(config)] == ids[1:]

    history = await usersyncd("history", "--config", str(config), "--since", "1h", "--json")
    assert history.returncode == 0, history.stderr
    rows = json.loads(history.stdout)
    assert len(rows) == len(fake_api.requests) == 1
    assert rows[0]["status"] == 202 and rows[0]["outcome"] == "ok"
    assert rows[0]["request_id"] == fake_api.requests[0].request_id
    assert rows[0]["response_request_id"].startswith("fake-")
    text = await usersyncd("history", "--config", str(config))
    assert "ok" in text.stdout and fake_api.requests[0].request_id in text.stdout
    bad = await usersyncd("history", "--config", str(config), "--since", "yesterday")
    assert bad.returncode == 2 and "--since yesterday" in bad.stderr
    nothing = await usersyncd("replay-failed", "--config", str(config))
    assert nothing.returncode == 2 and "--all" in nothing.stderr


async def test_replay_during_two_running_replicas_keeps_the_quota(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """Two replicas drain a backlog while replays re-queue dead letters: no violation, all delivered."""
    await seed(conn, 12_000)
    fake_api.limit_requests, fake_api.window = 6, 2.0
    fake_api.reject_emails = {f"user{n}@example.com" for n in range(1, 12_000, 1500)}
    config = make_config(
        database_url, fake_api.url, **fast(limits={"requests": 6, "window": 2.0, "margin": 0.1})
    )
    first, second = await spawn(config), await spawn(config)
    await fake_api.wait_for(lambda api: any(r.status == 422 for r in api.requests), timeout=30)
    fake_api.reject_emails = set()
    for _ in range(3):
        replay = await usersyncd("replay-failed", "--config", str(config), "--all")
        assert replay.returncode == 0, replay.stderr
        await asyncio.sleep(0.5)
    await fake_api.wait_for(lambda api: len(api.state) == 12_000, timeout=60)
    await usersyncd("replay-failed", "--config", str(config), "--all")  # any rejected since
    await fake_api.wait_for(lambda api: len(api.state) == 12_000, timeout=30)
    assert await first.stop() == 0 and await second.stop() == 0
    assert fake_api.violations == 0
    assert fake_api.max_arrivals_in_any_window(2.0) <= 6
    await assert_in_sync(conn, fake_api)


async def test_replayed_failure_resolves_when_one_of_its_users_is_gone(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A failure of users 7 and 8, replayed after user 8's row was deleted: user 7 is sent, and
    the failure resolves (one user sent, the other gone) instead of staying open mid-replay."""
    await seed(conn, 20)
    fake_api.reject_emails = {"user7@example.com", "user8@example.com"}
    config = make_config(database_url, fake_api.url, **fast())
    await run_once(spawn, config)
    [failure] = await open_failures(config)
    assert sorted(failure["user_ids"]) == ["7", "8"]

    fake_api.reject_emails = set()
    await conn.execute("DELETE FROM users WHERE id = 8")
    replay = await usersyncd("replay-failed", "--config", str(config), "--all")
    assert replay.returncode == 0, replay.stderr
    await run_once(spawn, config)
    assert "user7@example.com" in fake_api.state and "user8@example.com" not in fake_api.state
    row = await conn.fetchrow("SELECT resolved_at, resolution, replay_outcome FROM usersync.failures")
    assert row["resolved_at"] is not None
    assert (row["resolution"], row["replay_outcome"]) == ("synced", "synced")
    assert await open_failures(config) == []


async def test_failure_resolves_when_the_fixed_row_equals_what_the_api_holds(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """User 3 is sent, then its email is broken (an invalid failure), then restored: the row equals
    what the API holds, so nothing is sent, and the failure resolves as unchanged."""
    await seed(conn, 10)
    config = make_config(database_url, fake_api.url, **fast())
    await run_once(spawn, config)
    assert fake_api.sends["user3@example.com"] == 1

    await conn.execute("UPDATE users SET email = 'broken', updated_at = clock_timestamp() WHERE id = 3")
    await run_once(spawn, config)
    [failure] = await open_failures(config)
    assert (failure["kind"], failure["user_ids"]) == ("invalid", ["3"])

    await conn.execute(
        "UPDATE users SET email = 'user3@example.com', updated_at = clock_timestamp() WHERE id = 3"
    )
    await run_once(spawn, config)
    assert fake_api.sends["user3@example.com"] == 1  # the API held this state already (G4)
    assert await open_failures(config) == []
    row = await conn.fetchrow("SELECT resolution FROM usersync.failures WHERE id = $1", failure["id"])
    assert row["resolution"] == "unchanged"
    await assert_in_sync(conn, fake_api)
