"""The isolation budget (limits.isolate_share) and the 'configuration' pause in the quota ledger,
on a real PostgreSQL in compressed time (10 requests per 1.05 s span)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from usersyncd import db, quota_math
from usersyncd.config import LimitsConfig
from usersyncd.quota import Quota

pytestmark = pytest.mark.db

SCHEMA = "usersync"
LIMITS = LimitsConfig(requests=10, window=1.0, margin=0.05, isolate_share=0.2)
SPAN = timedelta(seconds=LIMITS.span)


@pytest.fixture
async def quota(database_url: str) -> AsyncIterator[Quota]:
    conn = await asyncpg.connect(database_url)
    try:
        await db.migrate(conn, SCHEMA)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=5)
    made = Quota(pool, LIMITS, SCHEMA, worker="w1", credentials_probe_every=0.2, request_timeout=0.0)
    try:
        yield made
    finally:
        await made.aclose()
        await pool.close()


@pytest.mark.parametrize(("limit", "share", "budget"), [(10, 0.2, 2), (50, 0.1, 5), (3, 0.1, 1), (7, 1.0, 7)])
def test_isolate_budget_is_a_share_of_at_least_one(limit: int, share: float, budget: int) -> None:
    assert quota_math.isolate_budget(limit, share) == budget
    assert quota_math.isolate_delay([-0.5] * budget, 0.0, limit, share, 1.0) == pytest.approx(0.5)
    assert quota_math.isolate_delay([-0.5] * (budget - 1), 0.0, limit, share, 1.0) == 0.0


async def test_isolation_waits_for_its_share_while_sends_go_on(
    quota: Quota, conn: asyncpg.Connection
) -> None:
    """2 isolation requests per span (0.2 of 10): the third waits a span; sends do not wait."""
    first = [await quota.acquire(kind="isolate") for _ in range(2)]
    third = asyncio.ensure_future(quota.acquire(kind="isolate"))
    began = time.monotonic()
    sends = [await quota.acquire(kind="send") for _ in range(5)]
    assert time.monotonic() - began < 0.5 and all(sends)  # the backlog keeps its share
    assert not third.done()
    late = await asyncio.wait_for(third, 10)
    assert late is not None and all(first)
    assert late.started_at - first[0].started_at >= SPAN  # type: ignore[union-attr]
    kinds = await conn.fetch(f"SELECT kind, count(*) AS n FROM {SCHEMA}.requests GROUP BY kind ORDER BY kind")
    assert [(k["kind"], k["n"]) for k in kinds] == [("isolate", 3), ("send", 5)]


async def test_configuration_pause_is_probed_by_the_prober_not_a_slot(
    quota: Quota, conn: asyncpg.Connection
) -> None:
    """While paused on 'configuration' with a prober set, no slot is granted; the prober runs every
    probe interval; its first success resumes sending."""
    answers = iter([False, False, True])
    calls: list[float] = []

    async def prober() -> bool:
        calls.append(time.monotonic())
        return next(answers)

    quota.prober = prober
    await quota.pause("configuration", 0.0, "HTTP 404: the account is unknown")
    state = await quota.state()
    assert (state.paused, state.pause_detail) == ("configuration", "HTTP 404: the account is unknown")
    slot = await asyncio.wait_for(quota.acquire(kind="send"), 10)
    assert slot is not None and not slot.probe
    assert len(calls) == 3 and calls[2] - calls[0] >= 2 * 0.2 - 0.05
    assert await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.pauses") == 0
    assert await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.requests") == 1  # the probes were not slots
