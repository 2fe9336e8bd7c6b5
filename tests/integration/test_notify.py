"""Opt-in change notifications (`source.notify_channel`): the trigger `usersyncd trigger-sql`
prints, installed on a real PostgreSQL, and the listener that survives a lost connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from usersyncd import checks, cli, notify
from usersyncd.config import SourceConfig, load_config

pytestmark = pytest.mark.db

HOSTILE = 'Users"; DROP TABLE x; --'
CHANNEL = "usersyncd_users"


async def test_trigger_sql_installs_and_notifies_once_per_transaction(
    conn: asyncpg.Connection,
    database_url: str,
    seed: Any,
    make_config: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The printed SQL runs as is (twice: it replaces itself) on a hostile table name; the trigger
    is statement-level, and each committed INSERT or UPDATE transaction sends one notification
    however many rows and statements it has (none for a rolled back one)."""
    await conn.execute("CREATE TABLE x (id int)")
    await seed(conn, 2000, table=HOSTILE)
    config = make_config(database_url, source={"table": f"public.{HOSTILE}", "notify_channel": CHANNEL})
    assert cli.main(["trigger-sql", "--config", str(config)]) == 0
    sql = capsys.readouterr().out
    source_config = SourceConfig(table=f"public.{HOSTILE}", notify_channel=CHANNEL)
    assert not await notify.trigger_installed(conn, source_config)
    assert await checks.check(load_config(config, environ={})) == 1  # `check` says it is missing
    assert "FAIL trigger usersyncd_notify" in capsys.readouterr().out
    await conn.execute(sql)
    await conn.execute(sql)  # idempotent
    assert await notify.trigger_installed(conn, source_config)
    other = SourceConfig(table=f"public.{HOSTILE}", notify_channel="another_channel")
    assert not await notify.trigger_installed(conn, other)  # installed for another channel
    assert await conn.fetchval("SELECT to_regclass('public.x')") is not None
    tgtype = await conn.fetch(
        "SELECT tgtype FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal",
        f'public."{HOSTILE.replace(chr(34), chr(34) * 2)}"',
    )
    assert len(tgtype) == 1 and tgtype[0]["tgtype"] & 1 == 0  # bit 0 clear: FOR EACH STATEMENT

    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener(CHANNEL, lambda *args: heard.append(args[2]))
    table = f'"{HOSTILE.replace(chr(34), chr(34) * 2)}"'
    try:
        await conn.execute(f"UPDATE {table} SET name = name || '!', updated_at = clock_timestamp()")
        async with conn.transaction():  # two statements, one transaction: one notification
            await conn.execute(f"UPDATE {table} SET name = 'a' WHERE id = 1")
            await conn.execute(
                f"INSERT INTO {table} (id, email, name, time_zone, updated_at)"
                " VALUES (5000, 'new@example.com', 'New', 'UTC', clock_timestamp())"
            )
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with conn.transaction():  # rolled back: nothing to say
                await conn.execute(f"UPDATE {table} SET name = 'b' WHERE id = 2")
                await conn.execute("SELECT 1 / 0")
        await conn.execute(f"SELECT 1 FROM {table} WHERE id = 3")  # a read: no notification
        await asyncio.sleep(0.3)
        await listener.execute("SELECT 1")  # notifications are delivered before this answer
        assert heard == [CHANNEL, CHANNEL]
    finally:
        await listener.close()


async def test_trigger_sql_without_a_channel_is_a_config_error(
    database_url: str, make_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`trigger-sql` with notify_channel unset says which key to set; exit 2, no SQL."""
    assert cli.main(["trigger-sql", "--config", str(make_config(database_url))]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "source.notify_channel" in out.err


async def test_listener_reconnects_after_its_connection_is_killed(database_url: str) -> None:
    """The listening connection killed: listening stops, comes back by itself, wakes the poller
    once on return (a change may have been missed), and notifications wake it again."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=3)
    notices = notify.ChangeNotices(pool, SourceConfig(notify_channel=CHANNEL))
    stop = asyncio.Event()
    task = asyncio.create_task(notices.run(stop))
    try:
        await asyncio.wait_for(notices.listening.wait(), 10)
        notices.changed.clear()
        await pool.execute("SELECT pg_notify($1, '')", CHANNEL)
        await asyncio.wait_for(notices.changed.wait(), 5)
        notices.changed.clear()

        killed = await pool.fetchval(  # the listener's, and any other idle one of this pool
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND state = 'idle' AND pid <> pg_backend_pid()"
        )
        assert killed >= 1
        for _ in range(100):
            if not notices.listening.is_set():
                break
            await asyncio.sleep(0.05)
        assert not notices.listening.is_set()
        await asyncio.wait_for(notices.listening.wait(), 10)  # back by itself
        assert notices.changed.is_set()  # and it polls once, for what it may have missed
        notices.changed.clear()
        await pool.execute("SELECT pg_notify($1, '')", CHANNEL)
        await asyncio.wait_for(notices.changed.wait(), 5)
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await pool.close()
