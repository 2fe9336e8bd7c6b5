"""systemd integration: the daemon speaks sd_notify (READY, STATUS, WATCHDOG, STOPPING); the
watchdog proves the event loop turns, not that the database answers; a stop while waiting for
the database at start is at once."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import fast, wait_in_sync
from pgproxy import PgProxy

from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]


class NotifySocket:
    """What systemd would hear: each datagram on NOTIFY_SOCKET, with the loop time it came."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    async def receive_until(self, word: str, timeout: float = 30) -> None:
        loop = asyncio.get_running_loop()
        while not any(word in m for _, m in self.messages):
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
            self.messages.append((loop.time(), data.decode()))

    async def collect_for(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), left)
            except TimeoutError:
                return
            self.messages.append((loop.time(), data.decode()))

    def times(self, word: str, since: float = float("-inf")) -> list[float]:
        return [t for t, m in self.messages if word in m and t >= since]

    def text(self) -> str:
        return "\n".join(m for _, m in self.messages)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    try:
        yield listener
    finally:
        listener.sock.close()


async def start_daemon(config: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    """The daemon; its log goes next to its config (.log), for a failing test to show."""
    with open(config.with_suffix(".log"), "ab") as log:  # the child keeps its own descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "usersyncd",
            "run",
            "--config",
            str(config),
            stdout=log,
            stderr=log,
            env={**os.environ, **env},
        )


async def reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_sd_notify_ready_status_watchdog_stopping(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    notify_socket: NotifySocket,
) -> None:
    """With NOTIFY_SOCKET set, as under Type=notify: READY=1 once ready, WATCHDOG=1 and STATUS=
    while running, STOPPING=1 on SIGTERM; exit 0."""
    await seed(conn, 100)
    config = make_config(database_url, fake_api.url, **fast())
    proc = await start_daemon(config, {"NOTIFY_SOCKET": notify_socket.path})
    try:
        await notify_socket.receive_until("READY=1")
        await notify_socket.receive_until("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        await notify_socket.receive_until("STOPPING=1")
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        await reap(proc)
    text = notify_socket.text()
    assert "STATUS=" in text
    assert text.index("READY=1") < text.index("STOPPING=1")


async def test_watchdog_keeps_coming_through_a_database_outage(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    notify_socket: NotifySocket,
) -> None:
    """WatchdogSec=3 s and the database gone for 10 s: WATCHDOG=1 never pauses for 3 s (systemd
    would SIGABRT), STATUS says the database is lost, and afterwards everyone is synced."""
    await seed(conn, 3000)
    proxy = await PgProxy(database_url).start()
    config = make_config(proxy.url, fake_api.url, **fast())
    proc = await start_daemon(config, {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "3000000"})
    loop = asyncio.get_running_loop()
    try:
        await notify_socket.receive_until("READY=1")
        await fake_api.wait_for(lambda api: len(api.requests) >= 1, timeout=30)
        cut_at = loop.time()
        proxy.cut()
        await notify_socket.collect_for(10.0)
        assert proc.returncode is None
        proxy.restore()
        back_at = loop.time()
        await notify_socket.collect_for(2.0)

        beats = [cut_at, *notify_socket.times("WATCHDOG=1", since=cut_at), loop.time()]
        gaps = [later - earlier for earlier, later in itertools.pairwise(beats)]
        assert max(gaps) < 3.0, f"a {max(gaps):.1f} s gap in WATCHDOG=1 during the outage: {gaps}"
        assert len(notify_socket.times("WATCHDOG=1", since=cut_at)) >= 5
        assert any("database unreachable" in m for t, m in notify_socket.messages if cut_at <= t <= back_at)

        await wait_in_sync(conn, fake_api, timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert fake_api.violations == 0
    finally:
        await reap(proc)
        await proxy.stop()


class SilentServer:
    """Accepts TCP connections and never answers: a database host that hangs a connection attempt."""

    async def start(self) -> SilentServer:
        self.server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client goes
        writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nobody listens there once this socket closes


@pytest.mark.parametrize("database", ["refused", "silent"])
async def test_sigterm_while_waiting_for_the_database_at_start_exits_0_at_once(
    database: str, make_config: Callable[..., Path], notify_socket: NotifySocket
) -> None:
    """The database does not answer at start (a closed port; a host that never replies): systemd
    hears READY with a STATUS saying the daemon waits (no start timeout kills it), WATCHDOG=1
    keeps coming, and SIGTERM ends the wait at once with exit 0."""
    silent = await SilentServer().start() if database == "silent" else None
    port = silent.port if silent else closed_port()
    config = make_config(f"postgresql://postgres@127.0.0.1:{port}/postgres", **fast())
    proc = await start_daemon(config, {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "3000000"})
    loop = asyncio.get_running_loop()
    try:
        # a hanging attempt (silent) fails only at the connect timeout: READY comes after 5 s anyway
        await notify_socket.receive_until("STATUS=waiting for the database", timeout=15)
        assert "READY=1" in notify_socket.text()
        # into the backoff's sleep, or the hanging attempt: pings a second apart, and never as
        # far apart as WATCHDOG_USEC (3 s), when systemd would kill the service
        await notify_socket.collect_for(3.5)
        pings = notify_socket.times("WATCHDOG=1")
        assert len(pings) >= 2, pings
        assert max(b - a for a, b in itertools.pairwise(pings)) < 3.0, pings
        assert proc.returncode is None
        signalled = loop.time()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        took = loop.time() - signalled
        assert code == 0
        assert took < 3.0, f"SIGTERM took {took:.1f} s (the promise is about a second)"
    finally:
        await reap(proc)
        if silent:
            await silent.stop()


async def test_sigterm_during_a_database_outage_exits_0(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    notify_socket: NotifySocket,
) -> None:
    """The database is gone mid-run and systemd stops the service: STOPPING=1, exit 0, promptly."""
    await seed(conn, 300)
    proxy = await PgProxy(database_url).start()
    config = make_config(proxy.url, fake_api.url, **fast())
    proc = await start_daemon(config, {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "3000000"})
    loop = asyncio.get_running_loop()
    try:
        await notify_socket.receive_until("READY=1")
        await wait_in_sync(conn, fake_api, timeout=30)  # idle workers look for work every poll
        proxy.cut()
        await notify_socket.collect_for(3.0)
        signalled = loop.time()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        took = loop.time() - signalled
        assert code == 0, config.with_suffix(".log").read_text()[-3000:]
        await notify_socket.receive_until("STOPPING=1", timeout=5)
        assert took < 5.0 + 3.0, f"took {took:.1f} s (shutdown_grace is 5 s)"
    finally:
        await reap(proc)
        await proxy.stop()
