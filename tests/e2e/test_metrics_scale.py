"""/metrics under load (SPEC §8): scrapes share one database snapshot, so a scrape storm costs
the database a few statements and /readyz stays fast."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from helpers import fast
from pgproxy import PgProxy

from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]

SCRAPES = 150


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def timed_get(client: httpx.AsyncClient, path: str) -> tuple[float, httpx.Response]:
    began = time.monotonic()
    response = await client.get(path)
    return time.monotonic() - began, response


async def test_150_concurrent_scrapes_cost_a_few_statements_and_readyz_stays_fast(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    await seed(conn, 500)
    proxy = await PgProxy(database_url).start()
    port = free_port()
    # a quiet daemon: the poller and idle workers look for work every 2 s
    config = make_config(
        proxy.url,
        fake_api.url,
        **fast(http={"listen": f"127.0.0.1:{port}"}, source={"poll_interval": 2.0}),
    )
    daemon = await spawn(config)
    try:
        await fake_api.wait_for(lambda api: len(api.state) == 500, timeout=30)
        limits = httpx.Limits(max_connections=SCRAPES + 10, max_keepalive_connections=SCRAPES + 10)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits
        ) as client:
            first = await client.get("/metrics")
            assert "usersyncd_database_up 1.0" in first.text
            await asyncio.sleep(0.5)
            idle = [(await timed_get(client, "/readyz"))[0] for _ in range(5)]

            before = len(proxy.executed)
            began = time.monotonic()
            scrapes = [asyncio.ensure_future(timed_get(client, "/metrics")) for _ in range(SCRAPES)]
            ready = []
            for _ in range(5):
                ready.append(await timed_get(client, "/readyz"))
            results = await asyncio.gather(*scrapes)
            took = time.monotonic() - began
            statements = len(proxy.executed) - before
            snapshots = proxy.count("open_failures", since=before)  # the backlog read of a scrape
        # each scrape used to read the database itself (~8 statements each, 1,200 here)
        assert snapshots <= 2, f"{snapshots} backlog reads for {SCRAPES} scrapes in {took:.1f} s"
        assert statements <= 100, f"{statements} statements for {SCRAPES} scrapes and 5 /readyz"
        for _, response in results:
            assert response.status_code == 200
            assert 'usersyncd_backlog_users{lane="live"}' in response.text
            assert "usersyncd_database_up 1.0" in response.text
        # a /readyz queued behind the scrapes for the pool timed out and said "database unreachable"
        assert all(r.status_code == 200 for _, r in ready), [r.text for _, r in ready]
        slowest = max(t for t, _ in ready)  # this process sends 150 requests meanwhile: slack
        assert slowest < 3.0, f"/readyz took {slowest:.2f} s during the scrapes (idle: {max(idle):.3f} s)"
        assert await daemon.stop() == 0
    finally:
        await proxy.stop()
