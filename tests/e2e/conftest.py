"""End-to-end fixtures: the real `usersyncd` process against the fake API on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from usersyncd.fakeapi import FakeApiProcess

pytestmark = pytest.mark.e2e


class DaemonProcess:
    """One `usersyncd` subprocess; its stderr (JSON log lines) goes to a file."""

    def __init__(self, config: Path, log_path: Path, *args: str) -> None:
        self.config = config
        self.log_path = log_path
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> DaemonProcess:
        self._log = open(self.log_path, "ab")
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("USER_API_KEY", "USER_API_URL", "USERSYNCD_DATABASE_URL")
        }
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "usersyncd",
            *self.args,
            "--config",
            str(self.config),
            stdout=self._log,
            stderr=self._log,
            env=env,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        finally:
            if self.proc.returncode is not None:
                self._log.close()

    def close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return await self.wait(timeout)

    def logs(self) -> list[dict[str, Any]]:
        entries = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                entries.append({"message": line, "level": "RAW"})
        return entries

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def wait_for_log(self, message: str, timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            for entry in self.logs():
                if entry.get("message", "").startswith(message):
                    return entry
            if self.proc is not None and self.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no log line {message!r}; log:\n{self.text()[-4000:]}")


class _Spare:
    """One fake API process started ahead, so a test does not wait for its imports."""

    def __init__(self) -> None:
        self.next: FakeApiProcess | None = None

    def take(self) -> FakeApiProcess:
        api, self.next = self.next or FakeApiProcess(api_key="test-key"), None
        try:
            api.wait_ready(timeout=60)
        finally:
            self.next = FakeApiProcess(api_key="test-key")
            self.next.launch()  # boots while the test runs
        return api

    def close(self) -> None:
        if self.next is not None:
            self.next.close(refresh=False)


@pytest.fixture(scope="session")
def _fake_api_spare() -> Iterator[_Spare]:
    spare = _Spare()
    try:
        yield spare
    finally:
        spare.close()


@pytest.fixture
def fake_api(_fake_api_spare: _Spare) -> Iterator[FakeApiProcess]:
    """The fake subscriber API on a free loopback port, in a process of its own: a busy test
    loop cannot delay its arrival stamps. It has FakeApi's attributes; it ends with the test."""
    api = _fake_api_spare.take()
    try:
        yield api
    finally:
        api.close(refresh=False)


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await spawn(config_path, "run", "--once")`: a started daemon, killed at teardown."""
    started: list[DaemonProcess] = []
    counter = iter(range(1000))

    async def make(config: Path, *args: str) -> DaemonProcess:
        process = DaemonProcess(config, tmp_path / f"daemon-{next(counter)}.log", *(args or ("run",)))
        started.append(process)
        return await process.start()

    yield make
    for process in started:
        if process.proc is not None and process.proc.returncode is None:
            process.proc.kill()
            await process.proc.wait()
        process.close_log()  # a test that failed before the process ended leaves it open
