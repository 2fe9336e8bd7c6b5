"""Rows whose updated_at is NULL (G14): found by id, staged once, reported by `check`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from usersyncd import checks, db, poller, source
from usersyncd.config import Config

pytestmark = pytest.mark.db

NULL_SEEN = datetime(1, 1, 1)  # sync_state.seen_updated_at of a NULL row: '-infinity' as asyncpg reads it


def make_config(database_url: str, **source_keys: Any) -> Config:
    return Config.model_validate(
        {
            "database": {"url": database_url},
            "api": {"url": "http://127.0.0.1:9", "key": "k"},
            "source": {"lookback": 60.0, **source_keys},
            "limits": {"requests": 2, "batch_size": 1000, "window": 2.0},
        }
    )


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    async with p.acquire() as conn:
        await db.migrate(conn, "usersync")
    yield p
    await p.close()


async def seed_with_nulls(conn: asyncpg.Connection, seed: Any, count: int, nulls: str) -> None:
    await seed(conn, count)
    await conn.execute("ALTER TABLE users ALTER COLUMN updated_at DROP NOT NULL")
    await conn.execute(f"UPDATE users SET updated_at = NULL WHERE {nulls}")


async def staged(conn: asyncpg.Connection) -> dict[str, tuple[Any, bool, int]]:
    rows = await conn.fetch("SELECT user_id, seen_updated_at, dirty, lane FROM usersync.sync_state")
    return {r["user_id"]: (r["seen_updated_at"], r["dirty"], r["lane"]) for r in rows}


async def test_null_rows_are_staged_once_and_new_ones_are_found(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str, monkeypatch: Any
) -> None:
    """Every NULL row is staged (paced lane) on the first start, by id over several pages and
    not again; a NULL row inserted later, and a row whose updated_at became NULL, are found by
    the sweep; a NULL row that gets an updated_at goes the live way."""
    monkeypatch.setattr(poller, "PAGE_SIZE", 3)  # the sweep pages by id
    await seed_with_nulls(conn, seed, 20, "id <= 7")
    config = make_config(database_url)
    service = poller.UserSyncService(
        config, pool, await source.inspect(conn, config.source), work_ready=asyncio.Event()
    )
    service.lookahead = 100_000
    await service.init_cursors()
    for _ in range(10):
        if (await service.poll_once()).caught_up:
            break
    state = await staged(conn)
    assert sorted(state, key=int) == [str(i) for i in range(1, 21)]
    assert {state[str(i)] for i in range(1, 8)} == {(NULL_SEEN, True, 1)}

    await conn.execute("UPDATE usersync.sync_state SET dirty = false")  # as if sent
    for _ in range(4):  # a whole sweep: nothing staged twice
        assert (await service.poll_once()).staged == 0

    await conn.execute("INSERT INTO users (id, email, updated_at) VALUES (0, 'zero@example.com', NULL)")
    await conn.execute("UPDATE users SET updated_at = NULL WHERE id = 15")
    await conn.execute("UPDATE users SET updated_at = clock_timestamp() WHERE id = 3")
    found: dict[str, Any] = {}
    for _ in range(4):  # within one sweep
        await service.poll_once()
        found = {u: v for u, v in (await staged(conn)).items() if v[1]}
    assert set(found) == {"0", "15", "3"}
    assert found["0"] == found["15"] == (NULL_SEEN, True, 1)
    assert found["3"][2] == 0  # a change since the first start: live


async def test_the_worker_reads_a_null_row_and_sees_it_gone(
    conn: asyncpg.Connection, seed: Any, database_url: str
) -> None:
    """fetch() and versions() give a NULL row a version (NULL_VERSION), which still differs
    from a deleted row's (none): the worker's re-read before sending tells them apart."""
    await seed_with_nulls(conn, seed, 3, "id = 2")
    src = await source.inspect(conn, make_config(database_url).source)
    rows = await src.fetch(conn, ["1", "2"])
    assert rows["2"].updated_at == source.NULL_VERSION and rows["2"].values["email"] == "user2@example.com"
    assert rows["1"].updated_at != source.NULL_VERSION
    versions = await src.versions(conn, ["1", "2", "3"])
    assert versions["2"] == rows["2"].updated_at
    await conn.execute("DELETE FROM users WHERE id = 2")
    assert (await src.versions(conn, ["2"])).get("2") != rows["2"].updated_at


async def test_no_sweep_when_start_from_is_a_moment(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """With start_from "now" nothing says a NULL row is newer: it is not synced (and `check` says so)."""
    await seed_with_nulls(conn, seed, 5, "id <= 2")
    config = make_config(database_url, start_from="now", lookback=0.0)
    service = poller.UserSyncService(
        config, pool, await source.inspect(conn, config.source), work_ready=asyncio.Event()
    )
    await service.init_cursors()
    assert (await service.poll_once()).caught_up
    assert await staged(conn) == {}


async def test_check_counts_null_rows(
    conn: asyncpg.Connection, seed: Any, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await seed_with_nulls(conn, seed, 10, "id IN (3, 4, 5)")
    assert await checks.check(make_config(database_url)) == 0
    out = capsys.readouterr().out
    assert "note 3 rows have a NULL updated_at: each is sent once" in out
    await conn.execute("UPDATE users SET updated_at = clock_timestamp()")
    assert await checks.check(make_config(database_url)) == 0
    assert "ok   no row has a NULL updated_at" in capsys.readouterr().out
