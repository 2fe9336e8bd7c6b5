"""Against a fake that answers as Drip does (SPEC §2, "The real Drip API"): a batch refused whole
costs only its culprits (isolation within limits.isolate_share), and a wrong account id pauses
sending on 'configuration' with nothing dead-lettered, until a probe through api.probe_path works."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from helpers import DRIP_ACCOUNT, drip_api, fast

from usersyncd import quota_math
from usersyncd.fakeapi import FakeApiProcess

pytestmark = [pytest.mark.e2e, pytest.mark.db]

ACCOUNT = DRIP_ACCOUNT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drip(api: FakeApiProcess, account: str = ACCOUNT) -> None:
    api.flavour, api.auth, api.account_id = "drip", "basic", account


async def open_failures(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT kind, user_ids, http_status, error FROM usersync.failures WHERE resolved_at IS NULL ORDER BY id"
    )


async def test_three_refused_records_among_3000_cost_only_themselves(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApiProcess,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """3 emails Drip refuses (a whole-batch 422 naming no record) among 3,000 users: 2,997
    delivered, exactly those 3 dead-lettered with the API's message, at most 60 extra requests,
    the search within its share of each span, 0 violations."""
    requests, share = 50, 0.1
    drip(fake_api)
    fake_api.limit_requests = requests
    bad = {"user7@example.com", "user1500@example.com", "user2999@example.com"}
    fake_api.reject_emails = frozenset(bad)
    await seed(conn, 3000)
    config = make_config(
        database_url,
        fake_api.url,
        **fast(
            api=drip_api(fake_api),
            limits={"requests": requests, "window": 2.0, "margin": 0.1, "isolate_share": share},
        ),
    )
    daemon = await spawn(config)
    await fake_api.wait_for(lambda api: len(api.state) == 2997, timeout=150)

    async def dead() -> list[asyncpg.Record]:
        rows = await open_failures(conn)
        return rows if sum(len(r["user_ids"]) for r in rows) >= 3 else []

    for _ in range(200):
        if rows := await dead():
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"3 failures expected, got {await open_failures(conn)}")
    assert await daemon.stop() == 0
    assert bad.isdisjoint(fake_api.state) and len(fake_api.state) == 2997
    assert {(r["kind"], r["http_status"]) for r in rows} == {("rejected", 422)}
    assert sorted(u for r in rows for u in r["user_ids"]) == ["1500", "2999", "7"]
    assert all("Email is invalid" in r["error"] for r in rows)
    batches = await conn.fetchval("SELECT count(*) FROM usersync.batches WHERE cardinality(user_ids) > 0")
    extra = len(fake_api.requests) - batches
    assert extra <= 60, f"{extra} extra requests ({len(fake_api.requests)} for {batches} batches)"
    assert fake_api.violations == 0
    span = 2.1
    starts = [
        r["t"]
        for r in await conn.fetch(
            "SELECT extract(epoch FROM started_at)::float8 AS t FROM usersync.requests"
            " WHERE kind = 'isolate' ORDER BY started_at"
        )
    ]
    assert 0 < len(starts) <= extra
    budget = quota_math.isolate_budget(requests, share)
    most = max(sum(1 for t in starts if s <= t < s + span) for s in starts)
    assert most <= budget, f"{most} isolation requests in one span, budget {budget}"
    print(f"isolation: {extra} extra requests, {len(starts)} of kind isolate, at most {most} per span")


async def test_wrong_account_id_pauses_and_resumes_once_the_probe_works(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApiProcess,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A 404 for another account: sending pauses on 'configuration' (CRITICAL once), /readyz 503
    says why, nobody is dead-lettered, GETs of api.probe_path probe it outside the batch quota;
    once the fake accepts the account, sending resumes and everyone arrives."""
    drip(fake_api, account="7654321")  # the config names ACCOUNT: every batch gets a 404
    fake_api.limit_requests = 10
    await seed(conn, 200)
    port = free_port()
    config = make_config(
        database_url,
        fake_api.url,
        **fast(
            api=drip_api(fake_api, probe_path="/v2/accounts/{account_id}"),
            retry={"attempts": 3, "backoff": 0.3},
            http={"listen": f"127.0.0.1:{port}"},
        ),
    )
    daemon = await spawn(config)
    await daemon.wait_for_log("sending paused: the API refuses the configuration", 30)
    await fake_api.wait_for(lambda api: api.probes >= 3, timeout=30)  # probes every backoff
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503 and "account" in ready.text, ready.text
    batches_while_paused = len(fake_api.requests)
    assert batches_while_paused <= 4  # one per worker at most; then only GETs
    assert {r.status for r in fake_api.requests} == {404}
    assert await open_failures(conn) == []
    pauses = await conn.fetch("SELECT reason FROM usersync.pauses")
    assert [p["reason"] for p in pauses] == ["configuration"]
    criticals = [e for e in daemon.logs() if e.get("level") == "CRITICAL"]
    assert len(criticals) == 1, criticals

    fake_api.account_id = ACCOUNT  # the operator fixed the account: the next probe works
    await fake_api.wait_for(lambda api: len(api.state) == 200, timeout=60)
    assert await daemon.stop() == 0
    assert await open_failures(conn) == []
    assert fake_api.violations == 0
    assert await conn.fetchval("SELECT count(*) FROM usersync.pauses") == 0
