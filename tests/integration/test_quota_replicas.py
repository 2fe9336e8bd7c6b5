"""Two replicas (two Quota objects on two pools) and the pauses between them (issue 7 item 8).

A pause recorded by one replica stops a slot the other was granted just before it; a slot
released or a pause resumed in one wakes the other's waiter long before its computed time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from usersyncd import db
from usersyncd.config import LimitsConfig
from usersyncd.quota import Quota

pytestmark = pytest.mark.db

SCHEMA = "usersync"
# a long window: a waiter's own computed time (10 s) is far from "woken at once"
LIMITS = LimitsConfig(requests=3, window=10.0, margin=0.1)
WOKEN_WITHIN = 2.0  # seconds; generous for a loaded machine, far below the computed wait

MakeQuota = Callable[..., Awaitable[Quota]]


@pytest.fixture
async def replica(database_url: str) -> AsyncIterator[MakeQuota]:
    """`await replica(name)`: a Quota on its own pool, as another process would have."""
    conn = await asyncpg.connect(database_url)
    try:
        await db.migrate(conn, SCHEMA)
    finally:
        await conn.close()
    made: list[tuple[asyncpg.Pool, Quota]] = []

    async def make(worker: str, probe_every: float = 60.0) -> Quota:
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=5)
        quota = Quota(
            pool, LIMITS, SCHEMA, worker=worker, credentials_probe_every=probe_every, request_timeout=0.0
        )  # timeout 0: a slot never recorded is a request over at once
        made.append((pool, quota))
        return quota

    yield make
    for pool, quota in made:
        await quota.aclose()
        await pool.close()


@pytest.mark.parametrize("reason", ["rate_limited", "credentials"])
async def test_a_pause_after_the_grant_stops_the_send(replica: MakeQuota, reason: str) -> None:
    """A granted; B meets a 429 (or 401) and pauses: A's confirm refuses the slot, so its
    request does not go into the pause; after release, A's next acquire waits the pause out."""
    a, b = await replica("a"), await replica("b")
    slot = await a.acquire(kind="send", batch_id=1)
    assert slot is not None and not slot.probe
    await b.pause(reason, 1.0, f"HTTP {429 if reason == 'rate_limited' else 401}")
    assert await a.confirm(slot) is None
    await a.release(slot)
    if reason == "credentials":  # the first acquire after the pause is its probe: that one goes
        probe = await asyncio.wait_for(a.acquire(kind="send"), 5)
        assert probe is not None and probe.probe
        confirmed = await a.confirm(probe)
        assert confirmed is not None
        await a.resume("credentials")
    else:
        began = time.monotonic()
        again = await asyncio.wait_for(a.acquire(kind="send"), 5)
        assert again is not None and time.monotonic() - began >= 0.8
        assert await a.confirm(again) is not None


async def test_a_pause_over_or_before_the_grant_does_not_stop_it(replica: MakeQuota) -> None:
    """A rate-limit pause that has ended does not refuse a slot; a probe granted under a
    credentials pause is confirmed (it is the request that tests the key)."""
    a, b = await replica("a"), await replica("b")
    await b.pause("rate_limited", 0.2, "HTTP 429")
    slot = await asyncio.wait_for(a.acquire(kind="send"), 5)
    assert slot is not None and await a.confirm(slot) is not None
    await b.pause("credentials", 0.0, "HTTP 401")
    probe = await asyncio.wait_for(a.acquire(kind="send"), 5)
    assert probe is not None and probe.probe
    assert await a.confirm(probe) is not None


async def test_a_release_in_one_replica_wakes_the_other(replica: MakeQuota) -> None:
    """B holds every slot of a 10 s window; A waits. B releases one: A has it within a short
    bound, not when the window turns."""
    a, b = await replica("a"), await replica("b")
    slots = [await b.acquire(kind="send") for _ in range(LIMITS.requests)]
    assert all(slot is not None for slot in slots)
    waiter = asyncio.ensure_future(a.acquire(kind="send"))
    await asyncio.sleep(0.5)  # A looked, found no slot, and sleeps until its computed time
    assert not waiter.done()
    began = time.monotonic()
    await b.release(slots[1])  # type: ignore[arg-type]
    slot = await asyncio.wait_for(waiter, WOKEN_WITHIN)
    assert slot is not None and time.monotonic() - began < WOKEN_WITHIN


async def test_a_resume_in_one_replica_wakes_the_other(replica: MakeQuota) -> None:
    """A credentials pause whose next probe is a minute away: B's probe works and B resumes;
    A's waiter starts within a short bound, not at the next probe time."""
    a, b = await replica("a", probe_every=60.0), await replica("b", probe_every=60.0)
    await b.pause("credentials", 0.0, "HTTP 401")
    probe = await b.acquire(kind="send")
    assert probe is not None and probe.probe  # the next probe is due in 60 s
    waiter = asyncio.ensure_future(a.acquire(kind="send"))
    await asyncio.sleep(0.5)
    assert not waiter.done()
    began = time.monotonic()
    await b.resume("credentials")
    slot = await asyncio.wait_for(waiter, WOKEN_WITHIN)
    assert slot is not None and not slot.probe and time.monotonic() - began < WOKEN_WITHIN


async def test_the_listener_comes_back_after_its_connection_dies(
    replica: MakeQuota, conn: asyncpg.Connection
) -> None:
    """A's listening connection is killed while A waits: it listens again, and B's release
    still wakes A within the bound."""
    a, b = await replica("a"), await replica("b")
    slots = [await b.acquire(kind="send") for _ in range(LIMITS.requests)]
    waiter = asyncio.ensure_future(a.acquire(kind="send"))
    await asyncio.sleep(0.5)
    killed = await conn.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND query ILIKE 'LISTEN%'"
    )
    assert killed == 1
    await asyncio.sleep(1.0)  # the listener notices, backs off and listens again
    assert not waiter.done()
    began = time.monotonic()
    await b.release(slots[0])  # type: ignore[arg-type]
    slot = await asyncio.wait_for(waiter, WOKEN_WITHIN)
    assert slot is not None and time.monotonic() - began < WOKEN_WITHIN
