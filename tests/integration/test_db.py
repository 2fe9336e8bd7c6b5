"""The database layer on a real PostgreSQL: migrations, quoting, the CLI's migrate."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from usersyncd import cli, db

pytestmark = pytest.mark.db

STATE_TABLES = {
    "cursors",
    "sync_state",
    "reconcile",
    "batches",
    "requests",
    "failures",
    "failure_users",
    "pauses",
    "processes",
    "pipelines",  # 0006
    "schema_version",
}


async def tables(conn: asyncpg.Connection, schema: str) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    return {r["tablename"] for r in rows}


async def test_migrate_creates_tables_once(conn: asyncpg.Connection) -> None:
    """A first migrate creates every state table; a second applies nothing and changes nothing."""
    first = await db.migrate(conn, "usersync")
    assert first == [v for v, _ in db.migration_files()]
    assert await tables(conn, "usersync") == STATE_TABLES
    applied_at = await conn.fetch("SELECT version, applied_at FROM usersync.schema_version")
    assert await db.migrate(conn, "usersync") == []
    assert await conn.fetch("SELECT version, applied_at FROM usersync.schema_version") == applied_at
    assert await db.schema_version(conn, "usersync") == first[-1]


async def test_concurrent_migrations_apply_once(database_url: str) -> None:
    """Two processes migrating at the same moment: the advisory lock lets exactly one apply."""
    conns = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(db.migrate(c, "usersync") for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, 0, len(db.migration_files())]
        count = await conns[0].fetchval("SELECT count(*) FROM usersync.schema_version")
        assert count == len(db.migration_files())
    finally:
        for c in conns:
            await c.close()


async def test_hostile_schema_name_is_quoted_not_executed(conn: asyncpg.Connection) -> None:
    """A state schema named like an injection becomes a schema of that name; no SQL runs."""
    await conn.execute("CREATE TABLE x (id int)")
    hostile = 'users"; DROP TABLE x; --'
    await db.migrate(conn, hostile)
    assert await conn.fetchval("SELECT to_regclass('public.x')") is not None
    assert await tables(conn, hostile) == STATE_TABLES


def test_quote_ident() -> None:
    """Identifiers are double-quoted with inner quotes doubled; schema-qualified names too."""
    assert db.quote_ident('a"b') == '"a""b"'
    assert db.qualified("public", 'users"; DROP TABLE x; --') == '"public"."users""; DROP TABLE x; --"'
    with pytest.raises(ValueError):
        db.quote_ident("")


def test_redact_dsn() -> None:
    """A DSN's password never reaches a log line."""
    assert db.redact_dsn("postgresql://u:secret@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert db.redact_dsn("postgresql://u@h/d") == "postgresql://u@h/d"
    assert (
        db.redact_dsn("postgresql://u@h/d?sslmode=require&password=pw")
        == "postgresql://u@h/d?sslmode=require&password=***"
    )


async def test_cli_migrate_twice(
    database_url: str, make_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`usersyncd migrate` creates the tables, then reports the schema up to date."""
    path = make_config(database_url)
    assert await asyncio.to_thread(cli.main, ["migrate", "--config", str(path)]) == 0
    assert "applied migrations" in capsys.readouterr().out
    assert await asyncio.to_thread(cli.main, ["migrate", "--config", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out
    connection = await asyncpg.connect(database_url)
    try:
        assert await tables(connection, "usersync") == STATE_TABLES
    finally:
        await connection.close()


async def test_unreachable_database_is_exit_1_one_line(
    make_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator command against a database that does not answer: exit 1, one clear line."""
    path = make_config("postgresql://nobody:pw-777@127.0.0.1:1/none")
    code = await asyncio.to_thread(cli.main, ["migrate", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "cannot connect" in err and "Traceback" not in err and "pw-777" not in err
