"""The quota ledger on a real PostgreSQL, in compressed time (10 requests per 1.05 s span).

Lower bounds are strict (the quota is never exceeded); upper bounds are loose (a loaded machine).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta

import asyncpg
import pytest

from usersyncd import api, db
from usersyncd.config import ApiConfig, LimitsConfig
from usersyncd.fakeapi import FakeApiProcess
from usersyncd.quota import Quota, Slot

pytestmark = pytest.mark.db

SCHEMA = "usersync"
LIMITS = LimitsConfig(requests=10, window=1.0, margin=0.05)
SPAN = timedelta(seconds=LIMITS.span)
SLACK = 0.8  # seconds of scheduling noise allowed on upper bounds (less than a span)

MakeQuota = Callable[..., Awaitable[Quota]]
Conn = asyncpg.Connection


@pytest.fixture
async def make_quota(database_url: str) -> AsyncIterator[MakeQuota]:
    """`await make_quota(worker=..., probe_every=...)`: a Quota on its own pool (a "replica")."""
    conn = await asyncpg.connect(database_url)
    try:
        await db.migrate(conn, SCHEMA)
    finally:
        await conn.close()
    pools: list[asyncpg.Pool] = []
    quotas: list[Quota] = []

    async def make(
        worker: str = "w1", probe_every: float = 5.0, limits: LimitsConfig = LIMITS, timeout: float = 0.0
    ) -> Quota:
        """`timeout` 0: a slot taken and never recorded is a request over at once, so the grant
        arithmetic shows plain; the tests of requests in flight give one."""
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
        pools.append(pool)
        quotas.append(
            Quota(
                pool,
                limits,
                SCHEMA,
                worker=worker,
                credentials_probe_every=probe_every,
                request_timeout=timeout,
            )
        )
        return quotas[-1]

    yield make
    for quota in quotas:
        await quota.aclose()
    for pool in pools:
        await pool.close()


async def ledger(conn: asyncpg.Connection, kind: str | None = None) -> list[asyncpg.Record]:
    rows = await conn.fetch(f"SELECT * FROM {SCHEMA}.requests ORDER BY started_at, id")
    return [row for row in rows if kind is None or row["kind"] == kind]


def assert_within_quota(starts: list[datetime]) -> None:
    """The (N+1)-th start is at least one span after the first, for every run of starts."""
    starts = sorted(starts)
    for first, later in zip(starts, starts[LIMITS.requests :], strict=False):
        assert later - first >= SPAN, (first, later)


async def fill(quota: Quota) -> list[Slot]:
    """Take every slot of the span (they are free: no wait)."""
    slots = [await quota.acquire(kind="send") for _ in range(LIMITS.requests)]
    assert all(slot is not None for slot in slots)
    return slots  # type: ignore[return-value]


async def test_concurrent_acquirers_share_one_quota(make_quota: MakeQuota, conn: Conn) -> None:
    """25 grants to 5 tasks: never more than 10 per span, yet the quota is used, not wasted."""
    quota = await make_quota()
    began = time.monotonic()

    async def task() -> list[Slot | None]:
        return [await quota.acquire(kind="send", batch_id=1, users=1000) for _ in range(5)]

    results = await asyncio.wait_for(asyncio.gather(*(task() for _ in range(5))), 10)
    elapsed = time.monotonic() - began
    starts = [row["started_at"] for row in await ledger(conn)]
    assert len(starts) == 25 and all(slot is not None for r in results for slot in r)
    assert_within_quota(starts)
    assert starts[10] - starts[0] >= SPAN
    assert starts[10] - starts[0] <= SPAN + timedelta(seconds=SLACK)  # the slot is taken when free
    assert elapsed <= 2 * LIMITS.span * 1.1 + SLACK
    assert quota.granted == 25 and quota.waits >= 10 and quota.wait_seconds > 0


async def test_two_replicas_share_the_ledger(make_quota: MakeQuota, conn: Conn) -> None:
    """Two Quotas on two pools, 10 acquirers each, 30 grants: never more than 10 per span."""
    replicas = [await make_quota(worker="a"), await make_quota(worker="b")]
    tickets = list(range(30))

    async def acquirer(quota: Quota) -> None:
        while tickets:
            tickets.pop()
            assert await quota.acquire(kind="send") is not None

    tasks = [acquirer(quota) for quota in replicas for _ in range(10)]
    await asyncio.wait_for(asyncio.gather(*tasks), 15)
    rows = await ledger(conn)
    assert len(rows) == 30
    assert_within_quota([row["started_at"] for row in rows])
    assert {row["worker"] for row in rows} == {"a", "b"}
    assert rows[-1]["started_at"] - rows[0]["started_at"] >= 2 * SPAN


async def test_restart_sees_the_ledger(make_quota: MakeQuota, conn: Conn) -> None:
    """A fresh Quota after 10 grants in this span waits for the span to free: no empty bucket."""
    restarted = await make_quota()  # its pool is ready before the span starts
    await fill(await make_quota())
    began = await conn.fetchval("SELECT clock_timestamp()")
    slot = await asyncio.wait_for(restarted.acquire(kind="retry"), 5)
    rows = await ledger(conn)
    assert slot is not None and rows[-1]["id"] == slot.id
    assert slot.started_at - rows[0]["started_at"] >= SPAN
    # it waited for the first slot to free, however long filling took on a busy machine
    assert rows[0]["started_at"] + SPAN > began and restarted.waits == 1


async def test_release_frees_the_slot_at_once(make_quota: MakeQuota, conn: Conn) -> None:
    """release() deletes the ledger row, and the next acquire gets its slot without waiting."""
    quota = await make_quota()
    slots = await fill(quota)
    await quota.release(slots[3])
    began = time.monotonic()
    slot = await quota.acquire(kind="send")
    assert time.monotonic() - began < LIMITS.span / 2
    ids = [row["id"] for row in await ledger(conn)]
    assert slot is not None and slots[3].id not in ids and slot.id in ids and len(ids) == 10


async def test_record_stores_the_outcome(make_quota: MakeQuota, conn: Conn) -> None:
    """record() fills the ledger row; a remaining count the ledger already allows adds nothing."""
    quota = await make_quota()
    slot = await quota.acquire(kind="send", batch_id=7, attempt=2, users=900)
    assert slot is not None
    await quota.record(
        slot,
        status=202,
        outcome="done",
        duration_ms=12.5,
        request_id="req-1",
        response_request_id="api-1",
        error=None,
        rate_limit_remaining=9,
    )
    [row] = await ledger(conn)
    assert (row["batch_id"], row["attempt"], row["users"], row["worker"]) == (7, 2, 900, "w1")
    assert (row["status"], row["outcome"], row["duration_ms"]) == (202, "done", 12.5)
    assert (row["request_id"], row["response_request_id"], row["error"]) == ("req-1", "api-1", None)


async def test_lower_remaining_from_the_api_wins(make_quota: MakeQuota, conn: Conn) -> None:
    """X-RateLimit-Remaining 2 when the ledger allows 8: another client used 6, and may use 7 in
    another window (the guard for the phase): 1 more grant, then none until the span."""
    quota = await make_quota()
    first = await quota.acquire(kind="send")
    second = await quota.acquire(kind="send")
    assert first is not None and second is not None
    await quota.record(
        second,
        status=202,
        outcome="done",
        duration_ms=5.0,
        request_id="r2",
        response_request_id=None,
        error=None,
        rate_limit_remaining=2,
    )
    assert [row["others"] for row in await ledger(conn)] == [None, 6]
    began = time.monotonic()
    assert await quota.acquire(kind="send")
    assert time.monotonic() - began < LIMITS.span / 2
    state = await quota.state()
    assert state.used == 10 and state.others == 7 and state.next_free_in > 0
    third = await asyncio.wait_for(quota.acquire(kind="send"), 5)
    assert third is not None and third.started_at - first.started_at >= SPAN


async def test_rate_limited_pause_holds_every_acquirer(make_quota: MakeQuota, conn: Conn) -> None:
    """pause('rate_limited', 0.5): acquire waits out the pause; state() reports it meanwhile."""
    quota = await make_quota()
    began = time.monotonic()  # before the pause: the time its statements take counts
    await quota.pause("rate_limited", 0.5, "429 Retry-After: 0.5")
    until = await conn.fetchval(f"SELECT until_at FROM {SCHEMA}.pauses")
    state = await quota.state()
    assert state.paused == "rate_limited" and 0 < state.paused_for <= 0.5
    assert state.pause_detail == "429 Retry-After: 0.5" and state.used == 0
    await quota.pause("rate_limited", 0.1, "an earlier end does not shorten the pause")
    assert await conn.fetchval(f"SELECT until_at FROM {SCHEMA}.pauses") == until
    slot = await asyncio.wait_for(quota.acquire(kind="send"), 5)
    assert slot is not None and slot.started_at >= until and not slot.probe
    assert time.monotonic() - began >= 0.45  # the DB clock decides; the wall clock agrees
    assert await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.pauses") == 0
    assert (await quota.state()).paused is None


async def test_credentials_pause_sends_one_probe(make_quota: MakeQuota, conn: Conn) -> None:
    """pause('credentials', 0.3): then exactly one acquirer probes; the rest wait for resume."""
    quota = await make_quota(probe_every=5.0)
    await quota.pause("credentials", 0.3, "HTTP 401")
    waiting = [asyncio.ensure_future(quota.acquire(kind="send", batch_id=i)) for i in range(3)]
    done, _ = await asyncio.wait(waiting, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    [probe] = [task.result() for task in done]
    assert probe is not None and probe.probe
    await asyncio.sleep(0.3)
    assert sum(task.done() for task in waiting) == 1
    state = await quota.state()
    assert state.paused == "credentials" and state.pause_detail == "HTTP 401"
    assert state.paused_for > 4 and state.used == 1 and state.next_free_in == 0
    await quota.resume("credentials")
    others = await asyncio.wait_for(asyncio.gather(*waiting), 2)
    assert [slot.probe for slot in others if slot is not probe] == [False, False]
    assert len(await ledger(conn)) == 3
    assert (await quota.state()).paused is None


async def test_failed_probe_waits_for_the_next_period(make_quota: MakeQuota, conn: Conn) -> None:
    """A failed probe pauses again; a released probe lets the next acquirer probe at once."""
    quota = await make_quota(probe_every=5.0)
    await quota.pause("credentials", 0.0, "HTTP 403")
    probe = await asyncio.wait_for(quota.acquire(kind="send"), 2)
    assert probe is not None and probe.probe
    await quota.release(probe)
    again = await asyncio.wait_for(quota.acquire(kind="retry"), 2)
    assert again is not None and again.probe
    began = time.monotonic()  # before the pause: the time its statements take counts
    await quota.pause("credentials", 0.2, "HTTP 403 again")
    third = await asyncio.wait_for(quota.acquire(kind="retry"), 2)
    assert third is not None and third.probe and time.monotonic() - began >= 0.15
    assert [row["kind"] for row in await ledger(conn)] == ["retry", "retry"]


@pytest.mark.parametrize("where", ["limiter", "ledger"])
async def test_stop_ends_a_wait_promptly(make_quota: MakeQuota, conn: Conn, where: str) -> None:
    """`stop` set while waiting (in the limiter or on the ledger): acquire returns None at once."""
    quota = await make_quota()
    await fill(quota)
    waiter = quota if where == "limiter" else await make_quota()
    stop = asyncio.Event()
    task = asyncio.ensure_future(waiter.acquire(kind="send", stop=stop))
    await asyncio.sleep(0.1)
    assert not task.done()
    stop.set()
    began = time.monotonic()
    assert await asyncio.wait_for(task, 1) is None
    assert time.monotonic() - began < 0.5  # not the ~1 s left of the span
    assert await waiter.acquire(kind="send", stop=stop) is None
    assert len(await ledger(conn)) == 10


async def test_state_reports_the_window(make_quota: MakeQuota) -> None:
    """state(): used/limit and when the next slot frees, with no pause."""
    quota = await make_quota()
    assert (await quota.state()).next_free_in == 0
    await fill(quota)
    state = await quota.state()
    assert (state.limit, state.window, state.used) == (10, 1.0, 10)
    assert 0 < state.next_free_in <= LIMITS.span
    assert (state.paused, state.paused_for, state.pause_detail) == (None, None, None)


async def test_prune_keeps_the_span(make_quota: MakeQuota, conn: Conn) -> None:
    """prune() deletes rows older than the retention, never one that still holds a slot."""
    quota = await make_quota()
    await conn.execute(
        f"INSERT INTO {SCHEMA}.requests (kind, started_at) VALUES"
        " ('send', clock_timestamp() - interval '8 days'),"
        " ('send', clock_timestamp() - interval '2 days')"
    )
    await quota.acquire(kind="send")
    assert await quota.prune(7) == 1
    assert len(await ledger(conn)) == 2
    assert await quota.prune(0) == 1  # a zero retention still keeps the span
    assert len(await ledger(conn)) == 1


async def test_lost_connections_are_waited_out(make_quota: MakeQuota, conn: Conn) -> None:
    """The connection killed mid-grant (waiting for the ledger lock): acquire retries, gets it."""
    quota = await make_quota()
    lock = "hashtext('usersyncd.quota:' || $1)"
    await conn.execute(f"SELECT pg_advisory_lock({lock})", SCHEMA)  # hold every grant back
    task = asyncio.ensure_future(quota.acquire(kind="send"))
    for _ in range(200):  # until the grant waits for the lock (a loaded machine takes a while)
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND wait_event_type = 'Lock'"
        )
        if killed:
            break
        await asyncio.sleep(0.05)
    assert killed == 1 and not task.done()
    await asyncio.sleep(0.3)
    await conn.execute(f"SELECT pg_advisory_unlock({lock})", SCHEMA)
    slot = await asyncio.wait_for(task, 5)
    assert slot is not None and [row["id"] for row in await ledger(conn)] == [slot.id]


async def answered(quota: Quota, slot: Slot, remaining: int | None, limit: int | None = None) -> None:
    """record() a 202 carrying X-RateLimit-Remaining (and -Limit, if given)."""
    await quota.record(
        slot,
        status=202,
        outcome="ok",
        duration_ms=3.0,
        request_id="r",
        response_request_id=None,
        error=None,
        rate_limit_remaining=remaining,
        **({} if limit is None else {"rate_limit_limit": limit}),
    )


# slower than LIMITS: "granted at once" and "waits for the span" stay apart on a loaded machine
SHARED = LimitsConfig(requests=10, window=3.0, margin=0.05)


async def grants_at_once(quota: Quota, conn: Conn, tries: int) -> int:
    """How many of `tries` acquires are granted within half a span (the rest is cancelled)."""
    before = len(await ledger(conn))
    tasks = [asyncio.ensure_future(quota.acquire(kind="send")) for _ in range(tries)]
    await asyncio.wait(tasks, timeout=quota.span / 2)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return len(await ledger(conn)) - before


async def test_a_learnt_share_outlives_the_span(make_quota: MakeQuota, conn: Conn) -> None:
    """Another client used 5 of the 10 (Remaining 4 after our one): a span later, with no answer
    since, 6 are still left to it (5 and the guard for the phase), not 10 granted (issue 7
    item 12: it used to expire)."""
    quota = await make_quota(limits=SHARED)
    slot = await quota.acquire(kind="send")
    assert slot is not None
    await answered(quota, slot, 4)
    await asyncio.sleep(SHARED.span + 0.1)
    assert await grants_at_once(quota, conn, 8) == 4
    state = await quota.state()
    assert (state.others, state.used) == (6, 10) and state.next_free_in > 0


async def test_more_room_shows_in_a_response(make_quota: MakeQuota, conn: Conn) -> None:
    """A higher figure holds for a span; once it is older, an answer showing more room wins."""
    quota = await make_quota(limits=SHARED)
    first = await quota.acquire(kind="send")
    assert first is not None
    await answered(quota, first, 4)  # others: 5, so 6 are left to them
    second = await quota.acquire(kind="send")
    assert second is not None
    await answered(quota, second, 6)  # others: 2, but 5 were seen within the span
    assert (await quota.state()).others == 6
    await asyncio.sleep(SHARED.span + 0.1)
    state = await quota.state()
    assert state.others == 3 and state.used == 3
    third = await quota.acquire(kind="send")
    assert third is not None
    await answered(quota, third, 9)  # only ours: the whole account is ours again
    assert (await quota.state()).others == 0
    assert await grants_at_once(quota, conn, 12) == 9


async def test_remaining_of_another_limit_is_not_believed(make_quota: MakeQuota, conn: Conn) -> None:
    """X-RateLimit-Limit 1000 when limits.requests is 10: its Remaining is another bucket's."""
    quota = await make_quota(limits=SHARED)
    slot = await quota.acquire(kind="send")
    assert slot is not None
    await answered(quota, slot, 0, limit=1000)
    [row] = await ledger(conn)
    assert (row["rate_limit_remaining"], row["rate_limit_limit"], row["others"]) == (0, 1000, None)
    assert (await quota.state()).others == 0
    assert await grants_at_once(quota, conn, 12) == 9
    await asyncio.sleep(SHARED.span + 0.1)
    later = await quota.acquire(kind="send")
    assert later is not None
    await answered(quota, later, 0, limit=10)  # the same limit: believed
    assert (await quota.state()).others == 9


async def test_ledger_commits_are_synchronous(make_quota: MakeQuota, conn: Conn) -> None:
    """With the database's synchronous_commit off, every ledger write (the grant, confirm, record,
    pause) commits with it on: the ledger survives a failover (issue 7 item 11)."""
    await conn.execute(
        f"ALTER DATABASE {db.quote_ident(await conn.fetchval('SELECT current_database()'))}"
        " SET synchronous_commit = off"
    )
    await conn.execute(
        f"""CREATE TABLE {SCHEMA}.seen (what text, setting text);
        CREATE FUNCTION {SCHEMA}.note() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {SCHEMA}.seen VALUES (TG_TABLE_NAME || ' ' || TG_OP, current_setting('synchronous_commit'));
            RETURN NULL;
        END $$;
        CREATE TRIGGER note AFTER INSERT OR UPDATE ON {SCHEMA}.requests FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.note();
        CREATE TRIGGER note AFTER INSERT OR UPDATE ON {SCHEMA}.pauses FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.note();"""
    )
    quota = await make_quota()  # a new pool: its connections start with the database's default
    async with quota._pool.acquire() as other:
        assert await other.fetchval("SHOW synchronous_commit") == "off"
    slot = await quota.acquire(kind="send")
    assert slot is not None
    confirmed = await quota.confirm(slot)
    assert confirmed is not None
    await answered(quota, confirmed, 9)
    await quota.pause("rate_limited", 0.1, "HTTP 429")
    seen = await conn.fetch(f"SELECT what, setting FROM {SCHEMA}.seen")
    assert [row["what"] for row in seen] == [
        "requests INSERT",
        "requests UPDATE",
        "requests UPDATE",
        "pauses INSERT",
    ]
    assert {row["setting"] for row in seen} == {"on"}


# ---- requests whose arrival the ledger does not know yet ---------------------------------------

IN_FLIGHT = LimitsConfig(requests=1, window=1.0, margin=0.05)  # one request per 1.05 s span


async def test_a_request_late_to_the_wire_and_slow_to_answer_keeps_its_slot(make_quota: MakeQuota) -> None:
    """G1 where the margin alone did not hold (found by the 30-minute soak, seed 696074): a
    request that reaches the API later than the margin after its stamp (a stalled event loop, a
    slow connect) and is answered only after a span. The next request must not start until the
    first one's answer says it has arrived; the fake API, in its own process, counts arrivals."""
    quota = await make_quota(limits=IN_FLIGHT, timeout=4.0)
    fake = FakeApiProcess(api_key="k", limit_requests=1, window=IN_FLIGHT.window)
    await fake.start()
    client = api.ExternalUserApi(ApiConfig(url=fake.url, key="k", timeout=4.0))
    try:
        fake.script(503, delay=2.0)  # the first request is answered two spans after it arrives

        async def send(stall: float) -> None:
            slot = await quota.acquire(kind="send")
            assert slot is not None
            confirmed = await quota.confirm(slot)
            assert confirmed is not None and confirmed.deadline is not None
            await asyncio.sleep(stall)  # stamped, but not on the wire yet
            outcome = await client.send([], deadline=confirmed.deadline)
            await quota.record(confirmed, **outcome.ledger_fields())

        first = asyncio.ensure_future(send(stall=0.3))
        await asyncio.sleep(0.1)  # the first has its slot
        began = time.monotonic()
        await send(stall=0.0)
        waited = time.monotonic() - began
        await first
        assert len(fake.requests) == 2
        assert fake.violations == 0, f"{fake.max_in_window} requests arrived within one window"
        # it waited for the first one's answer (about 2.2 s from now) and a window after it
        assert waited >= 2.0 + IN_FLIGHT.window
        assert waited < 2.2 + IN_FLIGHT.span + SLACK + 1.0
    finally:
        await client.aclose()
        await fake.stop()


async def test_a_request_never_answered_keeps_its_slot_until_its_deadline(
    make_quota: MakeQuota, conn: Conn
) -> None:
    """A request whose process died before recording its answer may have arrived as late as its
    deadline (`api.timeout` after its stamp): its slot is held until then and a span more, and
    no longer (G1 and G2)."""
    dead = await make_quota(limits=IN_FLIGHT, timeout=1.0)
    slot = await dead.acquire(kind="send")
    assert slot is not None and await dead.confirm(slot) is not None  # stamped; never recorded
    began = time.monotonic()
    alive = await make_quota(worker="w2", limits=IN_FLIGHT, timeout=1.0)
    later = await alive.acquire(kind="send")
    waited = time.monotonic() - began
    assert later is not None
    [died, granted] = await ledger(conn)
    assert granted["started_at"] - died["started_at"] >= timedelta(seconds=1.0 + IN_FLIGHT.window)
    assert 1.0 + IN_FLIGHT.window - 0.1 <= waited < 1.0 + IN_FLIGHT.span + SLACK
