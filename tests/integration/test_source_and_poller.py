"""Reading the users table and staging changes: quoting, keyset paging, lanes, lookahead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from usersyncd import db, poller, source
from usersyncd.config import Config, SourceConfig

pytestmark = pytest.mark.db

HOSTILE = 'users"; DROP TABLE x; --'


def make_config(database_url: str, **source_keys: Any) -> Config:
    return Config.model_validate(
        {
            "database": {"url": database_url},
            "api": {"url": "http://127.0.0.1:9", "key": "k"},
            "source": source_keys,
            "limits": {"requests": 2, "batch_size": 1000, "window": 2.0},
        }
    )


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    async with p.acquire() as conn:
        await db.migrate(conn, "usersync")
    yield p
    await p.close()


async def test_hostile_table_name_is_quoted_not_executed(
    conn: asyncpg.Connection, seed: Any, database_url: str
) -> None:
    """A source table named like an injection is read as a table; the other table survives."""
    await conn.execute("CREATE TABLE x (id int)")
    await seed(conn, 10, table=HOSTILE)
    src = await source.inspect(conn, SourceConfig(table=f"public.{HOSTILE}"))
    rows = await src.fetch(conn, ["1", "2", "99"])
    assert sorted(rows) == ["1", "2"]
    assert rows["1"].values["email"] == "user1@example.com"
    assert await conn.fetchval("SELECT to_regclass('public.x')") is not None


async def test_inspect_names_what_is_missing(conn: asyncpg.Connection, seed: Any) -> None:
    """A missing table, column, a non-timestamp updated_at and a broken filter are clear errors."""
    with pytest.raises(source.SourceError, match="table public.users does not exist"):
        await source.inspect(conn, SourceConfig())
    await seed(conn, 1)
    with pytest.raises(source.SourceError, match="source.fields.name: column 'full_name'"):
        await source.inspect(conn, SourceConfig(fields={"email": "email", "name": "full_name"}))
    with pytest.raises(source.SourceError, match="not a timestamp"):
        await source.inspect(conn, SourceConfig(updated_at_column="name"))
    with pytest.raises(source.SourceError, match="source.filter"):
        await source.inspect(conn, SourceConfig(filter="no_such_column IS NULL"))
    src = await source.inspect(conn, SourceConfig(filter="id > 0"))
    assert src.id_type == "bigint" and src.has_keyset_index
    await conn.execute("ALTER TABLE users ALTER COLUMN updated_at TYPE timestamp(6) without time zone")
    assert (await source.inspect(conn, SourceConfig())).id_type == "bigint"  # Rails' default type


async def test_backfill_pages_through_rows_sharing_one_updated_at(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """12,000 rows with one updated_at: keyset on (updated_at, id) stages each exactly once."""
    await seed(conn, 12_000, updated_at="timestamptz '2026-01-01 00:00:00+00'")
    config = make_config(database_url, poll_interval=0.1, lookback=0.0)  # done at once
    service = poller.UserSyncService(
        config, pool, await source.inspect(conn, config.source), work_ready=asyncio.Event()
    )
    service.lookahead = 100_000  # no lookahead limit in this test
    await service.init_cursors()
    staged = 0
    for _ in range(10):
        result = await service.poll_once()
        staged += result.staged
        if result.caught_up:
            break
    assert staged == 12_000 and result.caught_up
    assert (
        await conn.fetchval("SELECT count(DISTINCT user_id) FROM usersync.sync_state WHERE lane = 1")
        == 12_000
    )
    again = await service.poll_once()
    assert again.staged == 0  # nothing new, nothing staged twice


async def test_backfill_stages_only_the_lookahead(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """The backfill stages about two windows of quota ahead; the rest stays in the source table."""
    await seed(conn, 10_000)
    config = make_config(database_url)
    service = poller.UserSyncService(
        config, pool, await source.inspect(conn, config.source), work_ready=asyncio.Event()
    )
    assert service.lookahead == 2 * 2 * 1000
    await service.init_cursors()
    first = await service.poll_once()
    assert first.staged == 4000 and not first.caught_up
    await conn.execute("UPDATE usersync.sync_state SET dirty = false")  # as if sent
    second = await service.poll_once()
    assert second.staged == 4000
    assert await conn.fetchval("SELECT count(*) FROM usersync.sync_state") == 8000


async def test_live_lane_rescans_lookback_and_outranks_backfill(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """A change after the first start is staged in the live lane; a row committed late with an
    older updated_at (within lookback) is still found; an unchanged row is not staged again."""
    await seed(conn, 100)
    config = make_config(database_url, lookback=30.0)
    service = poller.UserSyncService(
        config, pool, await source.inspect(conn, config.source), work_ready=asyncio.Event()
    )
    await service.init_cursors()
    await service.poll_once()
    await asyncio.sleep(0.05)
    await conn.execute("UPDATE users SET name = 'live', updated_at = clock_timestamp() WHERE id = 50")
    await service.poll_once()
    row = await conn.fetchrow("SELECT lane, dirty FROM usersync.sync_state WHERE user_id = '50'")
    assert row["lane"] == 0 and row["dirty"]

    await conn.execute("UPDATE usersync.sync_state SET dirty = false")
    # stamped after the first start, behind the cursor: as a transaction committing late
    await conn.execute(
        "UPDATE users SET updated_at = (SELECT updated_at FROM users WHERE id = 50) - interval '1 ms'"
        " WHERE id = 60"
    )
    result = await service.poll_once()
    assert result.staged == 1
    assert await conn.fetchval("SELECT dirty FROM usersync.sync_state WHERE user_id = '60'")
    again = await service.poll_once()
    assert again.staged == 0


def make_service(config: Config, pool: asyncpg.Pool, src: source.Source) -> poller.UserSyncService:
    return poller.UserSyncService(config, pool, src, work_ready=asyncio.Event())


async def lanes(conn: asyncpg.Connection) -> dict[int, int]:
    """Dirty users by lane."""
    rows = await conn.fetch("SELECT lane, count(*) AS n FROM usersync.sync_state WHERE dirty GROUP BY lane")
    return {r["lane"]: r["n"] for r in rows}


async def test_rereading_the_lookback_writes_and_locks_nothing(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """A poll that only re-reads rows already staged (the lookback) leaves sync_state untouched
    (no new row version, no row lock: xmax stays 0) and the cursors where they were; it records
    only when it began (`cursors.reread_at`, where the next re-read starts)."""
    await seed(conn, 10)
    config = make_config(database_url, lookback=60.0)
    service = make_service(config, pool, await source.inspect(conn, config.source))
    await service.init_cursors()
    await service.poll_once()
    await conn.execute("UPDATE users SET name = name || '+', updated_at = clock_timestamp()")
    assert (await service.poll_once()).staged == 10
    await conn.execute("UPDATE usersync.sync_state SET dirty = false")  # as if sent
    before = await conn.fetch("SELECT user_id, xmin::text, xmax::text FROM usersync.sync_state ORDER BY 1")
    positions = "SELECT lane, updated_at, last_id, done, reread_at FROM usersync.cursors ORDER BY 1"
    cursors = await conn.fetch(positions)
    idle = await service.poll_once()
    assert idle.staged == 0  # the lookback was re-read (by the count alone: nothing was fresh)
    after = await conn.fetch("SELECT user_id, xmin::text, xmax::text FROM usersync.sync_state ORDER BY 1")
    assert [tuple(r) for r in after] == [tuple(r) for r in before]
    assert all(r["xmax"] == "0" for r in after), [tuple(r) for r in after][:3]
    moved = await conn.fetch(positions)
    assert [tuple(r)[:4] for r in moved] == [tuple(r)[:4] for r in cursors]
    assert moved[1]["reread_at"] > cursors[1]["reread_at"]  # the live lane's row


async def test_rows_from_before_the_first_start_are_the_backfills(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """Rows seeded just before the first start (inside the live lane's lookback) are staged by
    the backfill, in the paced lane, never in the live lane; a change after the start is live;
    a row stamped before the start and committed after it still arrives: the backfill walks
    rows stamped within lookback only once lookback has passed (G11, G3)."""
    await seed(conn, 3000, updated_at="clock_timestamp()")
    config = make_config(database_url, lookback=30.0)
    service = make_service(config, pool, await source.inspect(conn, config.source))
    service.lookahead = 1000
    await service.init_cursors()
    first = await service.poll_once()
    assert first.staged == 0 and not first.caught_up  # the walk waits for late commits
    first_start = await conn.fetchval("SELECT until_at FROM usersync.cursors WHERE lane = 'backfill'")
    await conn.execute("UPDATE users SET name = 'changed', updated_at = clock_timestamp() WHERE id = 2999")
    await conn.execute(  # committed late: stamped before the first start
        "INSERT INTO users (id, email, updated_at) VALUES (5000, 'late@example.com', $1::timestamptz - interval '1 ms')",
        first_start,
    )
    second = await service.poll_once()
    assert await lanes(conn) == {0: 1}
    assert second.live_staged == 1

    # as if lookback had passed: every time moves 31 s into the past
    await conn.execute("UPDATE users SET updated_at = updated_at - interval '31 s'")
    await conn.execute("UPDATE usersync.sync_state SET seen_updated_at = seen_updated_at - interval '31 s'")
    await conn.execute(
        "UPDATE usersync.cursors SET updated_at = updated_at - interval '31 s', until_at = until_at - interval '31 s'"
    )
    for _ in range(10):
        if (await service.poll_once()).caught_up:
            break
        assert (
            await conn.fetchval("SELECT count(*) FROM usersync.sync_state WHERE dirty AND lane = 1") <= 1000
        )
        await conn.execute("UPDATE usersync.sync_state SET dirty = false")  # as if sent
    else:
        pytest.fail("the backfill did not finish")
    assert await conn.fetchval("SELECT lane FROM usersync.sync_state WHERE user_id = '5000'") == 1
    assert await conn.fetchval("SELECT count(*) FROM usersync.sync_state") == 3001
    assert await conn.fetchval("SELECT count(*) FROM usersync.sync_state WHERE lane = 0") == 1


async def test_a_wave_goes_to_the_paced_lane_and_a_single_change_after_it_is_live(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """More new versions in a poll than the live lane takes in (a batch per slot) are a wave,
    paced; a single change after it is live; a wave user changed again moves to the live lane
    and stays one queue entry; a user sent live before and caught in a later wave is paced."""
    await seed(conn, 3000)
    config = make_config(database_url, lookback=60.0)  # a slot: (2 s + 1 %) / 2 requests
    service = make_service(config, pool, await source.inspect(conn, config.source))
    service.lookahead = 100_000
    await service.init_cursors()
    assert (await service.poll_once()).staged == 3000
    await conn.execute("UPDATE usersync.sync_state SET dirty = false")  # the backfill was sent

    await conn.execute("UPDATE users SET name = name || '+', updated_at = clock_timestamp() WHERE id <= 2500")
    wave = await service.poll_once()
    assert await lanes(conn) == {1: 2500}
    assert wave.staged == wave.wave == 2500 and wave.live_staged == 0

    await conn.execute("UPDATE users SET name = 'single', updated_at = clock_timestamp() WHERE id = 2999")
    await conn.execute("UPDATE users SET name = 'again', updated_at = clock_timestamp() WHERE id = 5")
    before = await conn.fetchrow("SELECT stage_seq, dirty_since FROM usersync.sync_state WHERE user_id = '5'")
    single = await service.poll_once()
    assert single.staged == single.live_staged == 2 and single.wave == 0
    assert await lanes(conn) == {0: 2, 1: 2499}
    after = await conn.fetchrow("SELECT stage_seq, dirty_since FROM usersync.sync_state WHERE user_id = '5'")
    assert after["stage_seq"] == before["stage_seq"] + 1 and after["dirty_since"] == before["dirty_since"]

    await conn.execute("UPDATE usersync.sync_state SET dirty = false")  # all sent
    await asyncio.sleep(service.slot)  # the live lane's intake of the last slot is over
    await conn.execute("UPDATE users SET name = name || '+', updated_at = clock_timestamp() WHERE id >= 1800")
    assert (await service.poll_once()).wave == 1201
    assert await conn.fetchval("SELECT lane FROM usersync.sync_state WHERE user_id = '2999'") == 1


async def test_the_live_lane_takes_in_one_batch_per_slot(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """Changes that come poll after poll, each below a batch, still make a wave once the live
    lane has taken in a batch within one quota slot (a nightly job committing in chunks)."""
    await seed(conn, 2000)
    config = make_config(database_url, lookback=60.0)
    service = make_service(config, pool, await source.inspect(conn, config.source))
    service.lookahead = 100_000
    service.slot = 3600.0  # no slot ends during the test
    await service.init_cursors()
    await service.poll_once()
    await conn.execute("UPDATE usersync.sync_state SET dirty = false")
    staged = []
    for chunk in range(3):
        await conn.execute(
            "UPDATE users SET name = 'job', updated_at = clock_timestamp() WHERE id > $1 AND id <= $1 + 400",
            chunk * 400,
        )
        staged.append(await service.poll_once())
    assert await lanes(conn) == {0: 800, 1: 400}
    assert [(r.live_staged, r.wave) for r in staged] == [(400, 0), (400, 0), (0, 400)]


async def test_an_idle_poll_rereads_only_the_last_lookback_of_time(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """After a wave, the live scan re-reads it for `lookback` seconds, not until the next change:
    a row committing later than that was stamped after the previous scan began, minus lookback."""
    await seed(conn, 10)
    config = make_config(database_url, lookback=1.0)
    service = make_service(config, pool, await source.inspect(conn, config.source))
    await service.init_cursors()
    await service.poll_once()
    await conn.execute("UPDATE users SET name = name || '+', updated_at = clock_timestamp()")
    assert (await service.poll_once()).read == 10
    await asyncio.sleep(1.2)
    await service.poll_once()  # began more than lookback after the rows' stamps
    idle = await service.poll_once()
    assert idle.read == 0
    # a late commit stamped within lookback of the previous scan is still found
    await conn.execute(
        "UPDATE users SET name = 'late', updated_at = clock_timestamp() - interval '0.5 s' WHERE id = 3"
    )
    assert (await service.poll_once()).live_staged == 1


async def test_a_page_reads_the_index_in_order_also_for_timestamp_without_time_zone(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool
) -> None:
    """Rails' `timestamp(6) without time zone`: a page walks the (updated_at, id) index and stops
    at its limit, no sort of the rest of the table (ORDER BY names the columns, not the casts)."""
    await seed(conn, 20_000)
    await conn.execute("ALTER TABLE users ALTER COLUMN updated_at TYPE timestamp(6) without time zone")
    await conn.execute("ALTER TABLE users ALTER COLUMN updated_at DROP NOT NULL")
    await conn.execute("UPDATE users SET updated_at = NULL WHERE id % 100 = 0")
    await conn.execute("ANALYZE users")
    src = await source.inspect(conn, SourceConfig())
    start = await conn.fetchval("SELECT min(updated_at)::timestamptz FROM users")
    cases = {
        "backfill": (start, "5", 1000, 1, await conn.fetchval("SELECT clock_timestamp()"), 0.0),
        "live": (start, "5", 1000, 0, 1000, await conn.fetchval("SELECT clock_timestamp()"), "20000"),
        "nulls": ("5", 1000, 1),
    }
    for scan, args in cases.items():
        sql = src.stage_page_sql("usersync", scan=scan, has_cursor_id=True)
        plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
        page = plan.split("CTE staged")[0]  # the page CTE (what follows is the staging)
        assert "Seq Scan" not in page, (scan, page)
        if scan == "nulls":  # the index finds them (a few are sorted, never the table)
            assert "Index Cond: ((updated_at IS NULL)" in page, page
        else:
            assert "Sort" not in page, (scan, page)


async def test_a_poll_reads_only_new_rows_and_the_reread_finds_late_commits(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """The polls of a running daemon (`reread=False`) read the rows stamped since the cursor,
    not the last `lookback` again: a wave of 3,000 rows is read once by them, so the next
    single change is staged by the next poll whatever the wave's size (G11). A row committed
    late behind the cursor is the re-read's (`reread_once`), which finds it in the live lane."""
    await seed(conn, 3000)
    config = make_config(database_url, lookback=60.0)
    service = make_service(config, pool, await source.inspect(conn, config.source))
    await service.init_cursors()
    await service.poll_once()
    await conn.execute("UPDATE users SET name = name || '+', updated_at = clock_timestamp()")
    assert (await service.poll_once(reread=False)).read == 3000
    again = await service.poll_once(reread=False)
    assert again.read <= 1  # the row at the cursor itself, at most
    await conn.execute("UPDATE users SET name = 'single', updated_at = clock_timestamp() WHERE id = 7")
    single = await service.poll_once(reread=False)
    assert single.read <= 2 and single.live_staged == 1  # (and the row at the cursor)
    # committed late: stamped behind the cursor, within lookback
    await conn.execute(
        "UPDATE users SET name = 'late',"
        " updated_at = (SELECT updated_at FROM users WHERE id = 7) - interval '1 ms' WHERE id = 9"
    )
    assert (await service.poll_once(reread=False)).staged == 0  # not the polls' to find
    late = await service.reread_once()
    assert late.live_staged == 1 and late.read >= 3000  # the re-read reads the lookback
    assert await conn.fetchval("SELECT dirty AND lane = 0 FROM usersync.sync_state WHERE user_id = '9'")


async def test_a_late_commit_is_found_after_the_polls_moved_the_cursor_past_its_lookback(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """A row committed within lookback of its stamp, but after a re-read began, is found by the
    next re-read even when the polls have meanwhile moved the cursor more than lookback past the
    stamp (re-reads run late after a database outage or on a busy machine). Found by the chaos
    soak: the re-read started at the cursor minus lookback, and such a commit was never sent."""
    await seed(conn, 10)
    config = make_config(database_url, lookback=1.0)
    service = make_service(config, pool, await source.inspect(conn, config.source))
    await service.init_cursors()
    await service.poll_once()
    late = await asyncpg.connect(database_url)
    try:
        async with late.transaction():
            await late.execute("UPDATE users SET name = 'late', updated_at = clock_timestamp() WHERE id = 3")
            await service.reread_once()  # began before the commit: cannot see it
            await conn.execute("UPDATE users SET name = 'on', updated_at = clock_timestamp() WHERE id = 4")
            await service.poll_once(reread=False)  # the cursor passes the late row's stamp
            await asyncio.sleep(0.3)
        stamped = await conn.fetchval("SELECT updated_at FROM users WHERE id = 3")
        committed = await conn.fetchval("SELECT clock_timestamp()")
        assert (committed - stamped).total_seconds() < 1.0  # within lookback: G3 holds for it
        await asyncio.sleep(1.0)
        await conn.execute("UPDATE users SET name = 'new', updated_at = clock_timestamp() WHERE id = 5")
        await service.poll_once(reread=False)  # the cursor is now more than lookback past the stamp
        found = await service.reread_once()
        assert found.staged >= 1
        assert (
            await conn.fetchval("SELECT seen_updated_at FROM usersync.sync_state WHERE user_id = '3'")
            == stamped
        )
    finally:
        await late.close()


async def test_a_wave_committed_after_the_poll_counted_still_goes_to_the_paced_lane(
    conn: asyncpg.Connection, seed: Any, pool: asyncpg.Pool, database_url: str
) -> None:
    """The poll counts new versions before staging, to send a wave to the paced lane whole;
    a wave committed between that count and the pages (seen under load) must not fill the
    live lane: a page with more new versions than the live lane may take goes paced."""
    await seed(conn, 3000)
    config = make_config(database_url, lookback=60.0)
    service = make_service(config, pool, await source.inspect(conn, config.source))
    await service.init_cursors()
    await service.poll_once()
    await conn.execute("UPDATE usersync.sync_state SET dirty = false")
    await conn.execute("UPDATE users SET name = name || '+', updated_at = clock_timestamp()")
    # the count saw one change, and the last key the wave has (as for a wave committed late,
    # stamped before the count: rows after the last key are the next poll's)
    service._fresh_sql = """
        SELECT 1, updated_at, id::text, statement_timestamp() FROM users
        WHERE $1::timestamptz IS NOT NULL AND $2::int IS NOT NULL
        ORDER BY updated_at DESC, id DESC LIMIT 1"""
    wave = await service.poll_once(reread=False)
    assert wave.staged == 3000 and wave.live_staged <= config.limits.batch_size
    assert (await lanes(conn)).get(0, 0) == wave.live_staged


async def test_a_change_committed_while_a_wave_is_staged_waits_for_the_next_poll_and_goes_live(
    conn: asyncpg.Connection,
    seed: Any,
    pool: asyncpg.Pool,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wave is staged page by page; a single change committed meanwhile is after the last key
    the poll counted, so the wave's later pages leave it to the next poll, which stages it in the
    live lane (G11). Found by CI: a change made while 20,000 users were being staged went paced
    with them and waited behind the wave. The poll is held at its first page by a row lock."""
    monkeypatch.setattr(poller, "PAGE_SIZE", 1000)
    await seed(conn, 3500)
    config = make_config(database_url, lookback=60.0)
    service = make_service(config, pool, await source.inspect(conn, config.source))
    service.lookahead = 100_000
    await service.init_cursors()
    await service.poll_once()
    await conn.execute("UPDATE usersync.sync_state SET dirty = false")  # the backfill was sent
    await conn.execute("UPDATE users SET name = name || '+', updated_at = clock_timestamp() WHERE id <= 3000")
    first = await conn.fetchval("SELECT id::text FROM users WHERE id <= 3000 ORDER BY updated_at, id LIMIT 1")
    holder = await asyncpg.connect(database_url)
    try:
        hold = holder.transaction()
        await hold.start()
        await holder.execute("SELECT 1 FROM usersync.sync_state WHERE user_id = $1 FOR UPDATE", first)
        polling = asyncio.create_task(service.poll_once(reread=False))
        for _ in range(200):  # the first page waits for the lock
            if await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the poll never reached the locked row")
        await conn.execute("UPDATE users SET name = 'single', updated_at = clock_timestamp() WHERE id = 3400")
        await hold.rollback()
        wave = await asyncio.wait_for(polling, 30)
    finally:
        await holder.close()
    assert wave.staged == wave.wave == 3000 and wave.live_staged == 0
    assert not await conn.fetchval("SELECT dirty FROM usersync.sync_state WHERE user_id = '3400'")
    single = await service.poll_once(reread=False)
    assert single.live_staged == 1 and single.wave == 0
    assert await lanes(conn) == {0: 1, 1: 3000}
