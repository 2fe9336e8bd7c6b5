"""The database shortcuts of issue 9 on a real PostgreSQL: array literals, pooled connections."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usersyncd import db, poller, queue, records, source
from usersyncd.config import Config

pytestmark = pytest.mark.db

IDS = st.lists(st.one_of(st.none(), st.text().map(lambda s: s.replace("\x00", ""))), max_size=20)


async def test_text_array_reads_back_as_sent(conn: asyncpg.Connection) -> None:
    """`$1::text::text[]` with `db.text_array` gives the same array as asyncpg's own text[]."""
    checked = 0

    @settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
    @given(IDS)
    def check(values: list[str | None]) -> None:
        nonlocal checked
        pending.append(values)
        checked += 1

    pending: list[list[str | None]] = []
    check()
    pending += [[], ["1", "2"], ['"', "\\", "{}", ",", " a ", "NULL", "", "ü"], [None]]
    for values in pending:
        assert await conn.fetchval("SELECT $1::text::text[]", db.text_array(values)) == values
        assert await conn.fetchval("SELECT $1::text[]", values) == values
    assert checked > 100


async def test_pool_release_sends_no_reset_query(database_url: str) -> None:
    """A pooled connection goes back without asyncpg's reset round trip; an open transaction is
    still rolled back."""
    pool = await db.create_pool(database_url, min_size=1, max_size=1)
    try:
        seen: list[str] = []
        async with pool.acquire() as proxy:
            raw = proxy._con  # type: ignore[attr-defined]
            raw.add_query_logger(lambda record: seen.append(record.query))
            await proxy.execute("CREATE TABLE t (x int)")
            tx = proxy.transaction()
            await tx.start()
            await proxy.execute("INSERT INTO t VALUES (1)")
        assert not any("RESET ALL" in q or "UNLISTEN" in q for q in seen), seen
        assert "ROLLBACK" in seen
        async with pool.acquire() as again:
            assert await again.fetchval("SELECT count(*) FROM t") == 0
    finally:
        await pool.close()


class _Counting(dict[str, str]):
    """The poller's statements, counting how often each is taken."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.taken: Counter[str] = Counter()

    def __getitem__(self, name: str) -> str:
        self.taken[name] += 1
        return super().__getitem__(name)


@pytest.mark.parametrize("lookahead", [100_000, 7_000])
async def test_backfill_poll_counts_the_paced_lane_once(
    conn: asyncpg.Connection, seed: Any, database_url: str, lookahead: int
) -> None:
    """One poll staging three pages counts the waiting users once per walk, the NULL sweep's and
    the backfill's (it counted before each page: quadratic in a long backfill), and still stops
    at the lookahead."""
    await seed(conn, 12_000)
    config = Config.model_validate(
        {
            "database": {"url": database_url},
            "api": {"url": "http://127.0.0.1:9", "key": "k"},
            "source": {"poll_interval": 60.0, "lookback": 0.0},
        }
    )
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as c:
            await db.migrate(c, "usersync")
        service = poller.UserSyncService(
            config, pool, await source.inspect(conn, config.source), work_ready=asyncio.Event()
        )
        service.lookahead = lookahead
        service.sql = counting = _Counting(service.sql)
        await service.init_cursors()
        counting.taken.clear()
        result = await service.poll_once()
        assert result.staged == min(12_000, lookahead)
        assert service.sweep_nulls  # the NULL sweep (none here) counts once too
        assert counting.taken["backfill_waiting"] == 2
        assert await conn.fetchval("SELECT count(*) FROM usersync.sync_state WHERE lane = 1") == result.staged
    finally:
        await pool.close()


async def test_take_ready_reads_what_user_state_reads(conn: asyncpg.Connection, database_url: str) -> None:
    """The former prepares the users `take_ready` took with the state it returned (no
    `user_state` round trip): the same `Known` as `user_state` gives, renames, tags and
    unsubscribes included (a column missing from its RETURNING fails this)."""
    await db.migrate(conn, "usersync")
    await conn.execute(
        "INSERT INTO usersync.sync_state (user_id, seen_updated_at, dirty, lane, stage_seq, sent_hash,"
        " sent_email, pending_email, sent_tags, unsubscribed_at, gone)"
        " VALUES ('1', now(), true, 0, 3, '\\x01', 'a@x.io', 'b@x.io', '[\"t\"]', NULL, false),"
        " ('2', now(), true, 1, 1, NULL, NULL, NULL, NULL, NULL, false),"
        " ('3', now(), true, 1, 2, NULL, 'c@x.io', NULL, NULL, now(), false)"
    )
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        q = queue.Queue(pool, "usersync", "user-sync", worker="test/w0", lease=30.0)
        expected = await q.user_state(["1", "2", "3"])
        assert expected["1"].prior == records.Prior("a@x.io", "b@x.io", ["t"])
        assert expected["3"].unsubscribed_at is not None
        taken = await q.take_ready(await q.new_batch(), 10)
        assert {u: lane for u, (lane, _) in taken.items()} == {"1": 0, "2": 1, "3": 1}
        assert {u: known for u, (_, known) in taken.items()} == expected
    finally:
        await pool.close()
