"""The status snapshot: exact for `usersyncd status`, capped counts and planner estimates for
the metrics, so that a scrape costs the same at millions of rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from usersyncd import config, db, status

pytestmark = pytest.mark.db


async def test_big_counts_are_estimates_for_the_metrics_and_exact_for_status(
    conn: asyncpg.Connection, database_url: str, make_config: Callable[..., Path]
) -> None:
    cfg = config.load_config(make_config(database_url))
    await db.migrate(conn, "usersync")
    rows = status.ESTIMATE_ABOVE + 20_000
    await conn.execute(
        "INSERT INTO usersync.sync_state (user_id, seen_updated_at, lane)"
        " SELECT g::text, clock_timestamp(), 1 FROM generate_series(1, $1) AS g",
        rows,
    )
    await conn.execute(
        "INSERT INTO usersync.sync_state (user_id, seen_updated_at, lane) VALUES ('live', now(), 0)"
    )
    await conn.execute("ANALYZE usersync.sync_state")
    pool = await db.create_pool(database_url, min_size=1, max_size=2)
    try:
        exact = await status.collect(pool, cfg, count_unstaged=False)
        cheap = await status.collect(pool, cfg, count_unstaged=False, exact=False)
    finally:
        await pool.close()
    assert exact.backfill_ready == rows and exact.estimated == []
    assert cheap.estimated == ["backfill_ready"]
    assert status.ESTIMATE_ABOVE <= cheap.backfill_ready <= 2 * rows  # a planner estimate, not a count
    assert cheap.live_ready == exact.live_ready == 1  # small counts stay exact
    assert cheap.open_failures == exact.open_failures == 0
