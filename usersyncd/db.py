"""The database layer: a pool that survives outages, identifier quoting, SQL files, migrations."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from functools import cache
from importlib import resources
from typing import TypeVar

import asyncpg
from loguru import logger

from usersyncd import dsn
from usersyncd.errors import DatabaseError

T = TypeVar("T")

CONNECT_BACKOFF_MAX = 30.0  # seconds between attempts to reach a lost database, at most

# Errors after which the same statement may succeed once the database is back.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
    # a connection that broke mid-protocol ("cannot switch to state …; another operation is in progress")
    asyncpg.exceptions.InternalClientError,
    # the transaction lost to another one: running it again is the cure
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncio.TimeoutError,
)


def quote_ident(name: str) -> str:
    """Quote one SQL identifier, so a hostile name is a name and never SQL."""
    if not name or "\x00" in name:
        raise ValueError(f"invalid SQL identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def qualified(schema: str, name: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def redact_dsn(url: str) -> str:
    """The database URL without its password (in the authority or as ?password=), for logs;
    in other text, every such URL in it (see `dsn`: a malformed password is found too)."""
    return dsn.redact(url)


def text_array(values: Sequence[str | None]) -> str:
    """A PostgreSQL array literal of `values` (None as NULL), for a `$n::text::text[]` parameter.

    One string for the driver to send: asyncpg encodes a text[] parameter element by element
    (about 0.3 µs each), five times the cost of this; a batch sends several arrays of 1,000 ids.
    Ids are usually digits or UUIDs (joined as they are); any other value is quoted and escaped."""
    if not values:
        return "{}"
    try:
        body = '","'.join(values)  # type: ignore[arg-type]  # a None raises: the general path
    except TypeError:
        body = None
    if body is not None and body.count('"') == 2 * (len(values) - 1) and "\\" not in body:
        return '{"' + body + '"}'  # no quote nor backslash inside a value: nothing to escape
    return "{" + ",".join("NULL" if v is None else _array_element(v) for v in values) + "}"


def _array_element(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@cache
def _sql_text(resource: str) -> str:
    return resources.files("usersyncd").joinpath(resource).read_text(encoding="utf-8")


def queries(name: str, schema: str) -> dict[str, str]:
    """Named statements from `sql/NAME.sql` (blocks headed `-- name --`), for this schema."""
    blocks: dict[str, str] = {}
    current: str | None = None
    for line in _sql_text(f"sql/{name}.sql").splitlines():
        header = re.fullmatch(r"--\s*(\w+)\s*--\s*", line)
        if header:
            current = header.group(1)
            blocks[current] = ""
        elif current is not None:
            blocks[current] += line + "\n"
    return {key: sql.strip().replace("{schema}", quote_ident(schema)) for key, sql in blocks.items()}


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, retry_forever: bool = False
) -> asyncpg.Pool:
    """A pool of connections; with `retry_forever`, wait out an unreachable database with backoff."""
    if not retry_forever:
        return await _connect(url, min_size=min_size, max_size=max_size)
    pool = await wait_for_pool(url, min_size=min_size, max_size=max_size, stop=asyncio.Event())
    assert pool is not None  # nobody can set that stop
    return pool


async def wait_for_pool(
    url: str,
    *,
    min_size: int,
    max_size: int,
    stop: asyncio.Event,
    waiting: Callable[[str], None] | None = None,
) -> asyncpg.Pool | None:
    """A pool, once the database answers; None as soon as `stop` is set (a signal ends the wait at
    once, even in the middle of a connection attempt). `waiting(why)` hears of each failed attempt."""
    delay = 0.5
    while True:
        try:
            return await _until_stopped(_connect(url, min_size=min_size, max_size=max_size), stop)
        except DatabaseError as exc:
            if not isinstance(exc.__cause__, CONNECTION_ERRORS):
                raise
            why = _why(exc.__cause__)
            logger.bind(retry_in=delay).warning("database unreachable, retrying: {}", why)
            if waiting is not None:
                waiting(why)
        if await _until_stopped(asyncio.sleep(delay, result=True), stop) is None:
            return None
        delay = min(delay * 2, CONNECT_BACKOFF_MAX)


async def _connect(url: str, *, min_size: int, max_size: int) -> asyncpg.Pool:
    try:
        return await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            command_timeout=60,
            server_settings={"application_name": "usersyncd"},
            reset=_no_session_state,
        )
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise DatabaseError(f"cannot connect to {redact_dsn(url)}: {_why(exc)}") from exc


async def _no_session_state(conn: asyncpg.Connection) -> None:
    """A pooled connection goes back as it is: asyncpg still rolls back an open transaction,
    but skips its reset query (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL), one more round
    trip on every release, about 20 per batch sent. usersyncd leaves no session state on a pooled
    connection: its advisory locks are transaction-level (`migrate`'s is released in a
    `finally`), it sets no setting, opens no cursor, and `quota_wake` removes its LISTEN."""


async def _until_stopped(operation: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`operation`'s result, or None as soon as `stop` is set (the operation is then cancelled)."""
    task = asyncio.ensure_future(operation)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: failing while cancelled changes nothing, we are stopping
    return None


async def retrying(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    stop: asyncio.Event | None = None,
) -> T:
    """Run `operation`, waiting out a lost database connection with backoff (nothing is lost:
    every operation is one transaction, retried whole)."""
    delay = 0.2
    while True:
        try:
            return await operation()
        except CONNECTION_ERRORS as exc:
            if stop is not None and stop.is_set():
                raise DatabaseError(f"{what}: database lost during shutdown: {_why(exc)}") from exc
            logger.bind(retry_in=delay, operation=what).warning(
                "database connection lost, retrying: {}", _why(exc)
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, CONNECT_BACKOFF_MAX)


def _why(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def migration_files() -> list[tuple[int, str]]:
    """(version, SQL) of every migration, in order."""
    folder = resources.files("usersyncd").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d+)_\w+\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(conn: asyncpg.Connection, schema: str) -> list[int]:
    """Create or upgrade usersyncd's tables; returns the versions applied now (none if current).

    Serialised by an advisory lock, so two processes starting together migrate once."""
    name = quote_ident(schema)
    await conn.execute("SELECT pg_advisory_lock(hashtext('usersyncd.migrate:' || $1))", schema)
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {name}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {name}.schema_version ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        done = {r["version"] for r in await conn.fetch(f"SELECT version FROM {name}.schema_version")}
        applied = []
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql.replace("{schema}", name))
                await conn.execute(f"INSERT INTO {name}.schema_version (version) VALUES ($1)", version)
            logger.bind(version=version, schema=schema).info("migration applied")
            applied.append(version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock(hashtext('usersyncd.migrate:' || $1))", schema)


async def schema_version(conn: asyncpg.Connection, schema: str) -> int | None:
    """The newest applied migration, or None when usersyncd's tables do not exist yet."""
    exists = await conn.fetchval("SELECT to_regclass($1)", f"{quote_ident(schema)}.schema_version")
    if exists is None:
        return None
    return await conn.fetchval(f"SELECT max(version) FROM {quote_ident(schema)}.schema_version")
