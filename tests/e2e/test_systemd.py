"""systemd integration: the daemon speaks sd_notify (READY, STATUS, WATCHDOG, STOPPING)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import fast

from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]


async def test_sd_notify_ready_status_watchdog_stopping(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """With NOTIFY_SOCKET set, as under Type=notify: READY=1 once ready, WATCHDOG=1 and STATUS=
    while running, STOPPING=1 on SIGTERM; exit 0."""
    await seed(conn, 100)
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    config = make_config(database_url, fake_api.url, **fast())
    env = {**os.environ, "NOTIFY_SOCKET": path}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "usersyncd",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    loop = asyncio.get_running_loop()
    messages: list[str] = []
    try:

        async def receive_until(word: str) -> None:
            while not any(word in m for m in messages):
                messages.append((await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)).decode())

        await receive_until("READY=1")
        await receive_until("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        await receive_until("STOPPING=1")
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()
    text = "\n".join(messages)
    assert "STATUS=" in text
    assert text.index("READY=1") < text.index("STOPPING=1")
