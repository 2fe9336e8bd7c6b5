"""API faults end to end (SPEC §2's response table, G3, G6): the real process, the fake API."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from helpers import Completions, assert_in_sync, fast

from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]

BACKOFF = 0.5  # retry.backoff in these tests: long enough to measure, short enough to wait for


def config(
    make_config: Callable[..., Path], database_url: str, api: FakeApi, **overrides: dict[str, Any]
) -> Path:
    return make_config(database_url, api.url, **fast(retry={"attempts": 3, "backoff": BACKOFF}, **overrides))


async def failures(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT kind, user_ids, http_status, attempts, error FROM usersync.failures"
        " WHERE resolved_at IS NULL ORDER BY id"
    )


async def wait_for_rows(
    conn: asyncpg.Connection,
    sql: str,
    count: int,
    timeout: float,
) -> list[asyncpg.Record]:
    """Poll `sql` until it returns at least `count` rows."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            rows = await conn.fetch(sql)
        except asyncpg.UndefinedTableError:  # the daemon has not migrated yet
            rows = []
        if len(rows) >= count:
            return rows
        if loop.time() > deadline:
            pytest.fail(f"{sql!r} returned {len(rows)} rows, not {count}, within {timeout} s")
        await asyncio.sleep(0.05)


def gaps(requests: list[Any]) -> list[float]:
    return [b.arrived - a.arrived for a, b in itertools.pairwise(requests)]


def emails(ids: range) -> set[str]:
    return {f"user{i}@example.com" for i in ids}


async def test_500_twice_then_success(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """Two 500s then a 202: 3 requests for the batch, retry.backoff apart; delivered; no failure."""
    await seed(conn, 20)
    fake_api.script(500, times=2)
    daemon = await spawn(config(make_config, database_url, fake_api))
    await fake_api.wait_for(lambda api: len(api.state) == 20, timeout=20)
    await asyncio.sleep(2 * BACKOFF)  # nothing more may follow
    assert [r.status for r in fake_api.requests] == [500, 500, 202]
    assert all(set(r.emails) == emails(range(1, 21)) for r in fake_api.requests)
    assert all(BACKOFF <= gap < BACKOFF + 2.0 for gap in gaps(fake_api.requests)), gaps(fake_api.requests)
    assert await failures(conn) == []
    batch = await conn.fetchrow(
        "SELECT status, attempts FROM usersync.batches WHERE cardinality(user_ids) > 0"
    )
    assert (batch["status"], batch["attempts"]) == ("done", 2)
    retries = [e for e in daemon.logs() if e.get("message") == "batch attempt failed; retrying"]
    assert [e["attempt"] for e in retries] == ["1/3", "2/3"]
    assert await daemon.stop() == 0
    await assert_in_sync(conn, fake_api)


async def test_500_three_times_is_dead_lettered(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """Three 500s: the users are in failures (exhausted, 3 attempts, HTTP 500); no 4th request."""
    await seed(conn, 20)
    fake_api.script(500, times=3)
    daemon = await spawn(config(make_config, database_url, fake_api))
    await wait_for_rows(conn, "SELECT 1 FROM usersync.failures", 1, timeout=20)
    await asyncio.sleep(3 * BACKOFF + 1.0)  # a 4th attempt would have come by now
    assert [r.status for r in fake_api.requests] == [500, 500, 500]
    assert all(gap >= BACKOFF for gap in gaps(fake_api.requests)), gaps(fake_api.requests)
    [failure] = await failures(conn)
    assert failure["kind"] == "exhausted"
    assert failure["attempts"] == 3
    assert failure["http_status"] == 500
    assert sorted(failure["user_ids"], key=int) == [str(i) for i in range(1, 21)]
    assert fake_api.state == {}
    assert await conn.fetchval("SELECT count(*) FROM usersync.sync_state WHERE dirty") == 0
    assert await daemon.stop() == 0
    assert len(fake_api.requests) == 3


async def test_422_naming_no_record_is_isolated_and_never_dead_letters_on_inference(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A 422 naming no record, once: the batch is split in halves (SPEC §2: isolation); every
    part is accepted, so nobody is dead-lettered (a record goes to failures only on its own
    refusal); the search costs at most two requests per halving."""
    await seed(conn, 20)
    fake_api.script(422, body={"errors": [{"code": "invalid", "message": "batch refused"}]})
    daemon = await spawn(config(make_config, database_url, fake_api))
    await fake_api.wait_for(lambda api: len(api.state) == 20, timeout=20)
    await asyncio.sleep(2 * BACKOFF + 0.5)
    statuses = [r.status for r in fake_api.requests]
    assert statuses[0] == 422 and set(statuses[1:]) == {202} and len(statuses) <= 1 + 2 * 5, statuses
    assert await failures(conn) == []
    assert await daemon.stop() == 0


async def test_422_naming_records_dead_letters_only_those(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A 422 naming 2 records: only those 2 are dead-lettered; the other 18 are delivered."""
    await seed(conn, 20)
    fake_api.reject_emails = {"user4@example.com", "user17@example.com"}
    daemon = await spawn(config(make_config, database_url, fake_api))
    await fake_api.wait_for(lambda api: len(api.state) == 18, timeout=20)
    await wait_for_rows(conn, "SELECT 1 FROM usersync.failures", 1, timeout=5)
    await asyncio.sleep(2 * BACKOFF)
    assert [r.status for r in fake_api.requests] == [422, 202]
    assert set(fake_api.requests[1].emails) == emails(range(1, 21)) - fake_api.reject_emails
    assert set(fake_api.state) == emails(range(1, 21)) - fake_api.reject_emails
    [failure] = await failures(conn)
    assert failure["kind"] == "rejected"
    assert failure["http_status"] == 422
    assert sorted(failure["user_ids"], key=int) == ["4", "17"]
    assert await daemon.stop() == 0


async def test_401_pauses_probes_and_resumes(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """401: CRITICAL log, a probe every retry.backoff, no failure; all arrives once the key works"""
    await seed(conn, 3000)  # 3 batches: every worker has one to send
    fake_api.api_key = "rotated-key"
    daemon = await spawn(config(make_config, database_url, fake_api))
    await fake_api.wait_for(lambda api: sum(r.status == 401 for r in api.requests) >= 5, timeout=20)
    fake_api.api_key = "test-key"
    await fake_api.wait_for(lambda api: len(api.state) == 3000, timeout=20)

    refused = [r for r in fake_api.requests if r.status == 401]
    assert len(refused) >= 5
    # requests granted before the first 401 was answered may still go out at once (one per
    # worker at most); after that only probes, each retry.backoff after the last refusal
    early = [r for r in refused if r.arrived < refused[0].arrived + BACKOFF]
    assert len(early) <= 4
    probes = [
        early[-1],
        *refused[len(early) :],
        next(r for r in fake_api.requests if r.status == 202),
    ]
    assert len(probes) >= 4
    assert all(BACKOFF <= gap < BACKOFF + 1.5 for gap in gaps(probes)), gaps(probes)
    # requests in flight when the first 401 came may still be answered 401, but none starts later
    assert all(r.status in (401, 202) for r in fake_api.requests)
    assert await failures(conn) == []
    assert await conn.fetchval("SELECT max(attempts) FROM usersync.batches") == 0
    logs = daemon.logs()
    assert any(e.get("level") == "CRITICAL" and "credentials" in e.get("message", "") for e in logs)
    assert any(e.get("message") == "sending resumed" for e in logs)
    assert await daemon.stop() == 0
    await assert_in_sync(conn, fake_api)


async def test_413_splits_the_batch_in_halves(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """413 for a full batch: it is sent again as two halves, and everything arrives once."""
    await seed(conn, 1000)
    fake_api.max_body_bytes = 60_000  # a batch of 1000 is about 75 kB, a half about 38 kB
    daemon = await spawn(config(make_config, database_url, fake_api))
    await fake_api.wait_for(lambda api: len(api.state) == 1000, timeout=20)
    await asyncio.sleep(2 * BACKOFF)
    assert [(r.status, len(r.subscribers)) for r in fake_api.requests] == [
        (413, 1000),
        (202, 500),
        (202, 500),
    ]
    assert fake_api.requests[0].body_bytes > fake_api.max_body_bytes
    assert set(fake_api.sends.values()) == {1}
    assert await failures(conn) == []
    assert await daemon.stop() == 0
    await assert_in_sync(conn, fake_api)


async def test_retry_sends_the_current_row_never_a_stale_one(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A user changed during retries: its latest state is sent, once, one request at a time."""
    await seed(conn, 10)
    completions = Completions(fake_api)
    daemon = await spawn(config(make_config, database_url, fake_api))
    await fake_api.wait_for(lambda api: len(api.state) == 10, timeout=20)
    before = len(fake_api.requests)

    fake_api.script(500, delay=1.0)  # the next request hangs for 1 s, then fails
    await conn.execute("UPDATE users SET name = 'v1', updated_at = clock_timestamp() WHERE id = 3")
    await fake_api.wait_for(lambda api: len(api.requests) > before, timeout=10)
    await conn.execute("UPDATE users SET name = 'v2', updated_at = clock_timestamp() WHERE id = 3")
    await fake_api.wait_for(lambda api: api.state["user3@example.com"]["name"] == "v2", timeout=10)
    await asyncio.sleep(1.0)  # a few polls: nothing more may go out for user 3

    mine = [r for r in fake_api.requests[before:] if "user3@example.com" in r.emails]
    names = [
        (r.status, next(s["name"] for s in r.subscribers if s["email"] == "user3@example.com")) for r in mine
    ]
    assert names == [(500, "v1"), (202, "v2")]
    assert fake_api.sends["user3@example.com"] == 2  # the seed, then v2 once: v1 was never accepted
    assert fake_api.concurrent_conflicts == 0
    assert completions.overlaps() == []
    assert await failures(conn) == []
    assert await daemon.stop() == 0
    await assert_in_sync(conn, fake_api)


async def test_429_retry_after_pauses_all_sending(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """429, Retry-After 1.5: no request reaches the API for 1.5 s; the batch keeps its attempts."""
    await seed(conn, 50)
    daemon = await spawn(config(make_config, database_url, fake_api))
    await fake_api.wait_for(lambda api: len(api.state) == 50, timeout=20)

    fake_api.script(429, headers={"Retry-After": "1.5"})
    await conn.execute("UPDATE users SET name = 'first', updated_at = clock_timestamp() WHERE id = 1")
    await fake_api.wait_for(lambda api: any(r.status == 429 for r in api.requests), timeout=10)
    limited = next(r for r in fake_api.requests if r.status == 429)
    # another change during the pause: another batch, which must wait too
    await conn.execute("UPDATE users SET name = 'second', updated_at = clock_timestamp() WHERE id = 2")
    await fake_api.wait_for(
        lambda api: (
            api.state["user1@example.com"]["name"] == "first"
            and api.state["user2@example.com"]["name"] == "second"
        ),
        timeout=10,
    )
    after = [r for r in fake_api.requests if r.arrived > limited.arrived]
    assert after, "nothing was sent after the 429"
    assert all(r.status == 202 for r in after)
    assert min(r.arrived for r in after) - limited.arrived >= 1.5
    assert min(r.arrived for r in after) - limited.arrived < 1.5 + 2.0
    batch_id = await conn.fetchval(
        "SELECT id FROM usersync.batches WHERE user_ids = ARRAY['1'] ORDER BY id DESC LIMIT 1"
    )
    assert await conn.fetchval("SELECT attempts FROM usersync.batches WHERE id = $1", batch_id) == 0
    assert await failures(conn) == []
    assert any(
        e.get("message", "").startswith("sending paused: the API rate-limited us") for e in daemon.logs()
    )
    assert await daemon.stop() == 0
    await assert_in_sync(conn, fake_api)


async def run_past_a_bad_row(
    conn: asyncpg.Connection,
    database_url: str,
    api: FakeApi,
    make_config: Callable[..., Path],
    spawn: Any,
    fields: dict[str, str],
) -> asyncpg.Record:
    """30 users, user 7's row unreadable: the 29 others arrive, user 7 has an open failure, the
    daemon keeps running (a change made later arrives too), no slot is left granted and unused,
    and SIGTERM exits 0. Returns user 7's failure."""
    daemon = await spawn(config(make_config, database_url, api, source={"fields": fields}))
    await api.wait_for(lambda a: len(a.state) == 29, timeout=30)
    [failure] = await wait_for_rows(
        conn,
        "SELECT kind, user_ids, field, error FROM usersync.failures WHERE resolved_at IS NULL",
        1,
        timeout=10,
    )
    assert "user7@example.com" not in api.state
    await conn.execute("UPDATE users SET name = 'later', updated_at = clock_timestamp() WHERE id = 3")
    await api.wait_for(lambda a: a.state["user3@example.com"]["name"] == "later", timeout=20)
    assert daemon.proc.returncode is None, daemon.text()[-3000:]
    assert await daemon.stop() == 0
    assert not any(e.get("level") == "CRITICAL" for e in daemon.logs())
    unused = await conn.fetchval("SELECT count(*) FROM usersync.requests WHERE outcome IS NULL")
    assert unused == 0
    assert [failure] == await failures_with_field(conn)
    return failure


async def failures_with_field(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT kind, user_ids, field, error FROM usersync.failures WHERE resolved_at IS NULL ORDER BY id"
    )


async def test_a_date_the_driver_cannot_decode_fails_only_its_user(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """G14: a `date` of 0044-03-15 BC (asyncpg: ValueError) is one user's failure, not a crash loop."""
    await seed(conn, 30)
    await conn.execute("ALTER TABLE users ADD COLUMN born date DEFAULT '1990-05-01'")
    await conn.execute("UPDATE users SET born = '0044-03-15 BC' WHERE id = 7")
    fields = {"email": "email", "name": "name", "custom_fields.born": "born"}
    failure = await run_past_a_bad_row(conn, database_url, fake_api, make_config, spawn, fields)
    assert (failure["kind"], failure["user_ids"], failure["field"]) == ("error", ["7"], "custom_fields.born")
    assert "ordinal must be >= 1" in failure["error"]
    assert fake_api.state["user8@example.com"]["custom_fields"] == {"born": "1990-05-01"}


async def test_bytes_invalid_in_the_database_encoding_fail_only_their_user(
    pg_server: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """G14: a SQL_ASCII database holding bytes that are not UTF-8 (CharacterNotInRepertoireError)."""
    name = f"usersyncd_ascii_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server)
    await admin.execute(
        f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'"
    )
    url = urlsplit(pg_server)._replace(path="/" + name).geturl()
    conn = await asyncpg.connect(url)
    try:
        await seed(conn, 30)
        await conn.execute(
            r"UPDATE users SET name = convert_from('\x4aff65'::bytea, 'SQL_ASCII') WHERE id = 7"
        )
        fields = {"email": "email", "name": "name", "time_zone": "time_zone"}
        failure = await run_past_a_bad_row(conn, url, fake_api, make_config, spawn, fields)
        assert (failure["kind"], failure["user_ids"], failure["field"]) == ("error", ["7"], "name")
        assert "CharacterNotInRepertoireError" in failure["error"]
    finally:
        await conn.close()
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


async def test_a_probe_answered_503_keeps_the_credentials_pause(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """401, then the key works but the next probe is answered 503: that proves nothing about the
    key, so the pause stays and nothing else goes out until the next probe, retry.backoff later."""
    await seed(conn, 3000)  # 3 batches: the other workers wait on the pause
    fake_api.api_key = "rotated-key"
    daemon = await spawn(config(make_config, database_url, fake_api))
    await fake_api.wait_for(lambda api: sum(r.status == 401 for r in api.requests) >= 2, timeout=20)
    fake_api.api_key = "test-key"
    fake_api.script(503)  # the next request is the next probe
    await fake_api.wait_for(lambda api: any(r.status == 503 for r in api.requests), timeout=20)
    await fake_api.wait_for(lambda api: len(api.state) == 3000, timeout=30)

    failed_probe = next(r for r in fake_api.requests if r.status == 503)
    after = [r for r in fake_api.requests if r.arrived > failed_probe.arrived]
    assert after[0].arrived - failed_probe.arrived >= BACKOFF - 0.1, gaps([failed_probe, *after])
    assert all(r.status == 202 for r in after)
    resumed = [e for e in daemon.logs() if e.get("message") == "sending resumed"]
    assert len(resumed) == 1
    assert await failures(conn) == []
    assert await daemon.stop() == 0
    await assert_in_sync(conn, fake_api)


async def test_bookkeeping_failing_after_an_accepted_batch_never_sends_it_again(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """The API accepts user 5's batch, but recording it fails for 2 s (a trigger raises): the
    record is retried until it succeeds, the batch is not sent again, the daemon keeps running."""
    await seed(conn, 20)
    daemon = await spawn(config(make_config, database_url, fake_api))
    await fake_api.wait_for(lambda api: len(api.state) == 20, timeout=20)
    await wait_for_rows(
        conn, "SELECT 1 FROM usersync.sync_state WHERE NOT dirty AND batch_id IS NULL", 20, timeout=10
    )
    before = len(fake_api.requests)
    await conn.execute(
        """
        CREATE TABLE public.refuse_sent (x int);
        INSERT INTO public.refuse_sent VALUES (1);
        CREATE FUNCTION public.refuse_sent() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM public.refuse_sent) THEN
                RAISE EXCEPTION 'injected: recording a send fails';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_sent BEFORE UPDATE ON usersync.sync_state FOR EACH ROW
        WHEN (NEW.user_id = '5' AND NEW.sent_at IS DISTINCT FROM OLD.sent_at)
        EXECUTE FUNCTION public.refuse_sent();
        """
    )
    await conn.execute("UPDATE users SET name = 'five', updated_at = clock_timestamp() WHERE id = 5")
    await fake_api.wait_for(lambda api: api.accepted > before, timeout=10)
    await asyncio.sleep(2.0)  # recording it fails meanwhile, again and again
    await conn.execute("DELETE FROM public.refuse_sent")
    await wait_for_rows(
        conn,
        "SELECT 1 FROM usersync.sync_state WHERE user_id = '5' AND batch_id IS NULL AND NOT dirty",
        1,
        timeout=20,
    )
    await asyncio.sleep(1.0)  # a resend would come by now
    assert fake_api.state["user5@example.com"]["name"] == "five"
    assert fake_api.sends["user5@example.com"] == 2  # the seed, then "five" once
    assert len(fake_api.requests) == before + 1
    assert any(e.get("message", "").startswith("could not record an accepted batch") for e in daemon.logs())
    assert daemon.proc.returncode is None
    assert await daemon.stop() == 0
