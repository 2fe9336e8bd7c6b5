"""A state schema belongs to one pipeline (SPEC §3, "Planned after these"): a config of another
pipeline on it refuses to start, with one line naming the owner, exit 2, and touches nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import fast, usersyncd

from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]


def refusal_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "belongs to pipeline" in line]


async def test_another_pipeline_on_the_same_state_schema_is_refused(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
) -> None:
    await seed(conn, 200)
    await conn.execute("CREATE TABLE members AS SELECT * FROM users")
    first = make_config(database_url, fake_api.url, **fast())
    ran = await usersyncd("run", "--once", "--config", str(first))
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert len(fake_api.state) == 200
    owner = await conn.fetch("SELECT name, source, api FROM usersync.pipelines")
    assert [tuple(r) for r in owner] == [("user-sync", "public.users", f"{fake_api.url}/subscribers/batches")]

    await conn.execute("UPDATE users SET name = 'changed', updated_at = clock_timestamp() WHERE id <= 10")
    state_before = await conn.fetch("SELECT * FROM usersync.sync_state ORDER BY user_id")
    cursors_before = await conn.fetch("SELECT * FROM usersync.cursors ORDER BY lane")
    requests_before = len(fake_api.requests)

    others = {
        "queue.name": fast(queue={"name": "newsletter"}),
        "source.table": fast(source={"table": "members"}),
        "api.url/batch_path": fast(api={"batch_path": "/other/batches"}),
    }
    for key, sections in others.items():
        other = make_config(database_url, fake_api.url, **sections)
        for command in (("run", "--once"), ("replay-failed", "--all"), ("status",)):
            result = await usersyncd(*command, "--config", str(other))
            assert result.returncode == 2, (command, result.stderr[-2000:])
            lines = refusal_lines(result.stderr)
            assert len(lines) == 1, result.stderr[-2000:]
            assert key in lines[0] and '"user-sync" (public.users ->' in lines[0], lines[0]
            assert "Traceback" not in result.stderr

    await asyncio.sleep(0.5)  # nothing is in flight that could still arrive
    assert len(fake_api.requests) == requests_before
    assert await conn.fetch("SELECT * FROM usersync.sync_state ORDER BY user_id") == state_before
    assert await conn.fetch("SELECT * FROM usersync.cursors ORDER BY lane") == cursors_before

    # the owner's own config still runs, and a credential in the API URL is never recorded
    again = await usersyncd("run", "--once", "--config", str(first))
    assert again.returncode == 0, again.stderr[-2000:]
    assert fake_api.state["user1@example.com"]["name"] == "changed"
    status = await usersyncd("status", "--config", str(first))
    assert status.returncode == 0, status.stderr[-2000:]


async def test_two_pipelines_starting_at_once_on_a_fresh_schema_one_wins(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
) -> None:
    await seed(conn, 50)
    a = make_config(database_url, fake_api.url, **fast(queue={"name": "a"}))
    b = make_config(database_url, fake_api.url, **fast(queue={"name": "b"}))
    results = await asyncio.gather(
        usersyncd("run", "--once", "--config", str(a)), usersyncd("run", "--once", "--config", str(b))
    )
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr[-1000:] for r in results]
    assert len(await conn.fetch("SELECT * FROM usersync.pipelines")) == 1
