"""Start-up steps after the pool's first connection wait out a database that went away (G10).

The chaos soak (tests/soak, seed 1275) saw replicas exit 1 when the database stopped between the
pool's first connection and their migrations or registration."""

from __future__ import annotations

import asyncpg
import pytest

from usersyncd.config import Config
from usersyncd.daemon import Daemon
from usersyncd.errors import DatabaseError


def daemon() -> Daemon:
    return Daemon(
        Config.model_validate(
            {"database": {"url": "postgresql://x@localhost/db"}, "api": {"url": "http://127.0.0.1:9"}}
        )
    )


async def test_a_start_up_step_is_retried_while_the_database_is_away() -> None:
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise asyncpg.exceptions.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation"
            )

    assert await daemon()._starting(step, "start") is True
    assert calls == 3


async def test_a_signal_while_waiting_ends_the_start_cleanly() -> None:
    """Stopped while the database is away: False (exit 0), not a database error."""
    d = daemon()

    async def step() -> None:
        d.stop.set()
        raise asyncpg.exceptions.ConnectionDoesNotExistError("gone")

    assert await d._starting(step, "start") is False


async def test_an_error_that_is_not_the_connection_still_ends_the_start() -> None:
    async def step() -> None:
        raise DatabaseError("database lost during shutdown")

    with pytest.raises(DatabaseError):
        await daemon()._starting(step, "start")
