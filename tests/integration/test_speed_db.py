"""The database shortcuts of issue 9 on a real PostgreSQL: array literals, pooled connections."""

from __future__ import annotations

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usersyncd import db

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
