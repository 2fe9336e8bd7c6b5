"""Shared set-up for benchmarks: an embedded PostgreSQL (or USERSYNCD_TEST_DATABASE_URL), a
seeded users table, the fake API in this process, and the real daemon in a subprocess."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import with_database, write_config  # noqa: E402

from usersyncd import db  # noqa: E402
from usersyncd.seed import seed_users  # noqa: E402


@asynccontextmanager
async def database() -> AsyncIterator[str]:
    """A fresh database on the embedded server (or the server in USERSYNCD_TEST_DATABASE_URL)."""
    server_url = os.environ.get("USERSYNCD_TEST_DATABASE_URL")
    server = None
    if not server_url:
        from usersyncd.demo import embedded_server

        root = Path(tempfile.mkdtemp(prefix="usersyncd-bench-"))
        server = embedded_server(root / "data")
        server_url = server.get_uri("postgres")
    name = f"usersyncd_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f"CREATE DATABASE {db.quote_ident(name)}")
    await admin.close()
    try:
        yield with_database(server_url, name)
    finally:
        admin = await asyncpg.connect(server_url)
        await admin.execute(f"DROP DATABASE IF EXISTS {db.quote_ident(name)} WITH (FORCE)")
        await admin.close()
        if server is not None:
            server.cleanup()


async def run_daemon(config: Path, *args: str, timeout: float, log: Path) -> int:
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "usersyncd",
            *(args or ("run", "--once")),
            "--config",
            str(config),
            stdout=out,
            stderr=out,
        )
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


__all__ = ["REPO", "Any", "database", "median", "run_daemon", "seed_users", "write_config"]
