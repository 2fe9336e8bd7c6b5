"""Reading the users table and staging changes: quoting, keyset paging, lanes, lookahead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from usersyncd import db, poller, source
from usersyncd.config import Config, SourceConfig

pytestmark = pytest.mark.db

HOSTILE = 'users"; DROP TABLE x; --'


def make_config(database_url: str, **source_keys: Any) -> Config:
    return Config.model_validate(
        {
            "database": {"url": database_url},
            "api": {"url": "http://127.0.0.1:9", "key": "k"},
            "source": source_keys,
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


async def test_hostile_table_name_is_quoted_not_executed(
    conn: asyncpg.Connection, seed: Any, database_url: str
) -> None:
    """A source table named like an injection is read as a table; the other table survives."""
    await conn.execute("CREATE TABLE x (id int)")
    await seed(conn, 10, table=HOSTILE)
    src = await source.inspect(conn, SourceConfig(table=f"public.{HOSTILE}"))
    rows = await src.fetch(conn, ["1", "2", "99"])
    assert sorted(rows) == ["1", "2"]
    assert rows["1"].values["email"] == "user1@example.com"
    assert await conn.fetchval("SELECT to_regclass('public.x')") is not None


async def test_inspect_names_what_is_missing(conn: asyncpg.Connection, seed: Any) -> None:
    """A missing table, column, a non-timestamp updated_at and a broken filter are clear errors."""
    with pytest.raises(source.SourceError, match="table public.users does not exist"):
        await source.inspect(conn, SourceConfig())
    await seed(conn, 1)
    with pytest.raises(source.SourceError, match="source.fields.name: column 'full_name'"):
        await source.inspect(conn, SourceConfig(fields={"email": "email", "name": "full_name"}))
    with pytest.raises(source.SourceError, match="not a timestamp"):
        await source.inspect(conn, SourceConfig(updated_at_column="name"))
    with pytest.raises(source.SourceError, match="source.filter"):
        await source.inspect(conn, SourceConfig(filter="no_such_column IS NULL"))
    src = await source.inspect(conn, SourceConfig(filter="id > 0"))
    assert src.id_type == "bigint" and src.has_keyset_index
    await conn.execute("ALTER TABLE users ALTER COLUMN updated_at TYPE timestamp(6) without time zone")
    assert (await source.inspect(conn, SourceConfig())).id_type == "bigint"  # Rails' default type


async def test_backfill_pages_through_rows_sharing_one_updated_at(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """12,000 rows with one updated_at: keyset on (updated_at, id) stages each exactly once."""
    await seed(conn, 12_000, updated_at="timestamptz '2026-01-01 00:00:00+00'")
    config = make_config(database_url, poll_interval=0.1)
    service = poller.UserSyncService(
        config, pool, await source.inspect(conn, config.source), work_ready=asyncio.Event()
    )
    service.lookahead = 100_000  # no lookahead limit in this test
    await service.init_cursors()
    result = await service.poll_once()
    assert result.staged == 12_000 and result.caught_up
    assert (
        await conn.fetchval("SELECT count(DISTINCT user_id) FROM usersync.sync_state WHERE lane = 1")
        == 12_000
    )
    again = await service.poll_once()
    assert again.staged == 0  # nothing new, nothing staged twice


async def test_backfill_stages_only_the_lookahead(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """The backfill stages about two windows of quota ahead; the rest stays in the source table."""
    await seed(conn, 10_000)
    config = make_config(database_url)
    service = poller.UserSyncService(
        config, pool, await source.inspect(conn, config.source), work_ready=asyncio.Event()
    )
    assert service.lookahead == 2 * 2 * 1000
    await service.init_cursors()
    first = await service.poll_once()
    assert first.staged == 4000 and not first.caught_up
    await conn.execute("UPDATE usersync.sync_state SET dirty = false")  # as if sent
    second = await service.poll_once()
    assert second.staged == 4000
    assert await conn.fetchval("SELECT count(*) FROM usersync.sync_state") == 8000


async def test_live_lane_rescans_lookback_and_outranks_backfill(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """A change after the first start is staged in the live lane; a row committed late with an
    older updated_at (within lookback) is still found; an unchanged row is not staged again."""
    await seed(conn, 100)
    config = make_config(database_url, lookback=30.0)
    service = poller.UserSyncService(
        config, pool, await source.inspect(conn, config.source), work_ready=asyncio.Event()
    )
    await service.init_cursors()
    await service.poll_once()
    await conn.execute("UPDATE users SET name = 'live', updated_at = clock_timestamp() WHERE id = 50")
    await service.poll_once()
    row = await conn.fetchrow("SELECT lane, dirty FROM usersync.sync_state WHERE user_id = '50'")
    assert row["lane"] == 0 and row["dirty"]

    await conn.execute("UPDATE usersync.sync_state SET dirty = false")
    await conn.execute(
        "UPDATE users SET updated_at = clock_timestamp() - interval '10 seconds' WHERE id = 60"
    )
    result = await service.poll_once()
    assert result.staged == 1
    assert await conn.fetchval("SELECT dirty FROM usersync.sync_state WHERE user_id = '60'")
    again = await service.poll_once()
    assert again.staged == 0
