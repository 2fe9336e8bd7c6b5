"""`usersyncd status --watch`: redrawn in place on a terminal, one snapshot after another in a
pipe (or JSON lines), stopped by Ctrl-C or SIGTERM with exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import usersyncd

pytestmark = [pytest.mark.e2e, pytest.mark.db]


async def _watch(config: Path, *extra: str, stdout: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "usersyncd",
        "status",
        "--config",
        str(config),
        "--watch",
        "0.3",
        *extra,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )


async def _read_until(proc: asyncio.subprocess.Process, count: int, marker: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while seen.count(marker) < count and time.monotonic() < deadline:
        try:
            seen += await asyncio.wait_for(proc.stdout.read(4096), timeout=1)
        except TimeoutError:
            continue
    return seen


async def test_watch_in_a_pipe_prints_snapshots_and_stops_on_ctrl_c(
    conn: asyncpg.Connection, database_url: str, seed: Any, make_config: Callable[..., Path]
) -> None:
    """Off a terminal: snapshot after snapshot, no control codes; SIGINT ends it with exit 0."""
    await seed(conn, 10)
    config = make_config(database_url)
    proc = await _watch(config, stdout=asyncio.subprocess.PIPE)
    seen = await _read_until(proc, 3, b"--- ", timeout=30)
    proc.send_signal(signal.SIGINT)
    rest, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()
    text = (seen + rest).decode()
    assert text.count("--- ") >= 3 and text.count("backlog:") >= 3
    assert "\x1b" not in text and "\r" not in text


async def test_watch_json_lines(
    conn: asyncpg.Connection, database_url: str, seed: Any, make_config: Callable[..., Path]
) -> None:
    """`--watch --json`: one JSON object a line, each with the backlog; SIGTERM ends it with exit 0."""
    await seed(conn, 10)
    proc = await _watch(make_config(database_url), "--json", stdout=asyncio.subprocess.PIPE)
    seen = await _read_until(proc, 2, b"\n", timeout=30)
    proc.send_signal(signal.SIGTERM)
    rest, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(line) for line in (seen + rest).decode().splitlines() if line.strip()]
    assert len(lines) >= 2 and all("backlog" in line and "time" in line for line in lines)


async def test_watch_on_a_terminal_redraws_in_place(
    conn: asyncpg.Connection, database_url: str, seed: Any, make_config: Callable[..., Path]
) -> None:
    """On a terminal (a pty): the snapshot is redrawn with cursor control codes, not appended."""
    await seed(conn, 10)
    master, slave = pty.openpty()
    try:
        proc = await _watch(make_config(database_url), stdout=slave)
        os.close(slave)
        seen = b""
        deadline = time.monotonic() + 30
        while seen.count(b"backlog:") < 3 and time.monotonic() < deadline:
            ready = await asyncio.to_thread(_read_pty, master)
            seen += ready
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 15)
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert seen.count(b"backlog:") >= 3
    assert b"\x1b[" in seen  # cursor movement: drawn in place


def _read_pty(fd: int) -> bytes:
    import select

    readable, _, _ = select.select([fd], [], [], 1.0)
    if not readable:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:  # the other side closed
        return b""


async def test_watch_rejects_a_bad_interval(database_url: str, make_config: Callable[..., Path]) -> None:
    """`--watch 0` is a usage error: exit 2, one line."""
    result = await usersyncd("status", "--config", str(make_config(database_url)), "--watch", "0")
    assert result.returncode == 2 and "expected seconds between 0 and 86400" in result.stderr
