"""An idle poll's load on the application's database (issue 9): one index probe of the source
table per lane, asserted on the statements a real idle poll runs, with EXPLAIN."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from usersyncd import db, poller, source
from usersyncd.config import Config

pytestmark = pytest.mark.db


def make_config(database_url: str) -> Config:
    return Config.model_validate(
        {
            "database": {"url": database_url},
            "api": {"url": "http://127.0.0.1:9", "key": "k"},
            # the NULL sweep runs too; the backfill ends once a lookback has passed since the first start
            "source": {"lookback": 0.5, "start_from": "beginning"},
            "limits": {"requests": 50, "batch_size": 1000, "window": 2.0},
        }
    )


async def test_an_idle_poll_is_one_index_probe_per_lane(
    conn: asyncpg.Connection, seed: Any, database_url: str
) -> None:
    """On a synced 20,000-row table, an idle poll reads the source twice (the live lane and the
    paced lane's NULL sweep; the backfill is done), each an index probe of (updated_at, id)
    and no sequential scan of the source or of sync_state. Counted on the plans as executed
    (EXPLAIN ANALYZE, rolled back): the live count's read of the last key, for a poll with
    something to stage, is planned and never executed."""
    await seed(conn, 20_000)
    config = make_config(database_url)
    logged: list[Any] = []  # every statement the poller runs, with its arguments

    async def log_queries(connection: asyncpg.Connection) -> None:
        connection.add_query_logger(logged.append)

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2, init=log_queries)
    try:
        async with pool.acquire() as c:
            await db.migrate(c, "usersync")
        service = poller.UserSyncService(
            config, pool, await source.inspect(conn, config.source), work_ready=asyncio.Event()
        )
        await service.init_cursors()
        for _ in range(20):  # the backfill, as if each page were sent at once
            caught_up = (await service.poll_once()).caught_up
            await conn.execute("UPDATE usersync.sync_state SET dirty = false")
            if caught_up:
                break
            await asyncio.sleep(0.2)
        assert caught_up
        await conn.execute("ANALYZE")
        await service.poll_once()  # the statements are prepared and cached, as in a running daemon
        logged.clear()
        result = await service.poll_once()
    finally:
        await pool.close()
    assert result.staged == 0
    reads = [q for q in logged if '"public"."users"' in q.query]
    assert len(reads) == 2, [q.query[:200] for q in reads]
    for query in reads:
        explain = "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + query.query
        rolled_back = conn.transaction()  # the sweep's statement stages what it finds (nothing)
        await rolled_back.start()
        try:
            plan = "\n".join(r[0] for r in await conn.fetch(explain, *query.args))
        finally:
            await rolled_back.rollback()
        scans = [
            line.strip().removeprefix("->  ")
            for line in plan.splitlines()
            if " on users" in line and "(never executed)" not in line
        ]
        # none: PostgreSQL ≥ 17 knows that a NOT NULL updated_at has no NULL row to sweep
        assert len(scans) <= 1, plan
        for scan in scans:
            assert scan.startswith(("Index Only Scan using", "Index Scan using")), plan
            assert "users_updated_at_id" in scan, plan
        assert "Seq Scan" not in plan, plan
