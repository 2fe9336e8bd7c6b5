"""UserSyncService: polls the users table and stages changed users for the workers.

Lanes (G11, `sync_state.lane`): 0 `live`, sent first and on any free slot; 1 `paced`, one
slot apart, with what is left of the quota. The first start is the boundary. The live scan
follows rows stamped since then; a re-read of the last `lookback` seconds, every quarter of
it and apart from the polls, finds rows committed late by long transactions. Older rows are
the backfill's: its walk stages them in the paced lane, at most a bounded lookahead (two
windows of quota) ahead, so a backlog of millions stays in the source table; it walks rows
stamped within `lookback` only once `lookback` has passed, so a late commit around the first
start is not missed either. The live lane takes in at most one batch per quota slot: a poll
with more new versions than that is a wave (a migration, a nightly job) and goes to the paced
lane, so a single change after it still goes first. Rows whose updated_at is NULL have no
place in the keyset: a sweep by id stages each one not staged yet (a page per poll, in the
paced lane). Staging is one SQL statement per page, in the transaction that advances the
cursor; no row is held in memory.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from loguru import logger

from usersyncd import db, notify, quota_wake
from usersyncd.config import Config
from usersyncd.source import Source

PAGE_SIZE = 5000  # rows per staging statement
BEGINNING = datetime(1, 1, 1, tzinfo=UTC)  # before any real updated_at (sent as '-infinity')
LIVE, PACED = 0, 1  # sync_state.lane
BACKFILL = PACED


@dataclass
class PollResult:
    read: int = 0
    staged: int = 0
    live_staged: int = 0  # of which in the live lane
    wave: int = 0  # of which in the paced lane because the poll was a wave
    caught_up: bool = False  # the live lane reached the end and the backfill is done


class UserSyncService:
    def __init__(
        self,
        config: Config,
        pool: asyncpg.Pool,
        source: Source,
        *,
        work_ready: asyncio.Event,
        live_ready: asyncio.Event | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.source = source
        self.work_ready = work_ready
        self.live_ready = live_ready  # set when live users are staged: they need not wait the pace
        self.sql = db.queries("poller", config.database.state_schema)
        schema = config.database.state_schema
        self._page_sql = {
            (scan, has_id): source.stage_page_sql(schema, scan=scan, has_cursor_id=has_id)
            for scan in ("live", "backfill", "nulls")
            for has_id in (False, True)
        }
        self._fresh_sql = source.fresh_count_sql(schema)
        # Staged but unsent users of the paced lane, at most: two windows of quota.
        self.lookahead = 2 * config.limits.requests * config.limits.batch_size
        # The NULL sweep's place (in memory: after a restart it starts over, which only reads).
        # With start_from other than "beginning" there is no time to compare a NULL with.
        self.sweep_nulls = config.source.start_from == "beginning"
        self._nulls_after: str | None = None
        self._nulls_cycles = 0  # sweeps through every NULL row completed by this process
        # users the live lane took in over the last slot (in memory: per process)
        self.slot = config.limits.span / config.limits.requests
        self._intake: collections.deque[tuple[float, int]] = collections.deque()
        self.last: PollResult = PollResult()
        self._backfill_done = False  # the backfill cursor's `done`, once seen (it never goes back)
        self._cursors_made = asyncio.Event()  # init_cursors is done: re-reads may begin

    async def init_cursors(self) -> None:
        """First start only: the live lane begins now, the backfill lane at `start_from`."""
        start_from = self.config.source.start_from
        moment = self.config.source.start_moment()
        async with self.pool.acquire() as conn, conn.transaction():
            now = await conn.fetchval("SELECT clock_timestamp()")
            # the rows stamped within lookback before the first start are the backfill's too
            # (one of them may still commit): before, the live lane's lookback re-read them
            recent = now - timedelta(seconds=self.config.source.lookback)
            backfill_from = BEGINNING if start_from == "beginning" else min(moment or recent, recent)
            created = await conn.fetchval(
                self.sql["init_cursors"],
                now,
                backfill_from,
                backfill_from >= now,
            )
        if created:
            logger.bind(live_from=now.isoformat(), backfill_from=str(backfill_from)).info("cursors created")

    async def poll_once(self, *, reread: bool = True) -> PollResult:
        """One poll: the live scan (with the lookback re-read unless `reread` is False: `run`
        re-reads in a task of its own), the NULL sweep and the backfill."""
        result = PollResult()
        live_done = await self._poll_live(result, reread=reread)
        if result.staged:  # now, not after the paced lane's share of the poll: they go first
            self.work_ready.set()
            if result.live_staged and self.live_ready is not None:
                self.live_ready.set()
        # the paced lane's staging gets a share of the poll, so the next live scan is not late
        deadline = time.monotonic() + self.config.source.poll_interval / 2
        nulls_done = await self._sweep_nulls(result, deadline)  # before the backfill: room first
        backfill_done = await self._poll_backfill(result, deadline)
        result.caught_up = live_done and backfill_done and nulls_done
        await self._announce(result, "poll")
        self.last = result
        return result

    async def reread_once(self) -> PollResult:
        """The lookback re-read alone: rows committed late, stamped behind the live cursor."""
        result = PollResult()
        await self._poll_live(result, reread=True)
        await self._announce(result, "lookback re-read")
        return result

    async def _announce(self, result: PollResult, what: str) -> None:
        """Wake the workers for what was staged, and log it (at INFO when it found something)."""
        if result.staged:
            self.work_ready.set()
        if result.live_staged and self.live_ready is not None:
            self.live_ready.set()
        entry = logger.bind(rows_read=result.read, users_staged=result.staged, live_staged=result.live_staged)
        # at INFO with the cursors when it found something to send (an idle poll does not read
        # them only to log them)
        if result.staged:
            cursors = await self.pool.fetch(self.sql["cursors"])
            entry.bind(
                cursor={r["lane"]: r["updated_at"].isoformat() if r["updated_at"] else None for r in cursors}
            ).info(what)
        else:
            entry.debug(what)

    def _wake(self, staged: int) -> None:
        """Workers hear of users as soon as a page is staged, not when the whole poll ends: at a
        first start the poll stages the lookahead (100,000 users by default, seconds of work)."""
        if staged:
            self.work_ready.set()

    async def _poll_live(self, result: PollResult, *, reread: bool) -> bool:
        """Scan from the live cursor to the end, from the cursor minus lookback if `reread`.
        True when the end was reached."""
        lookback = timedelta(seconds=self.config.source.lookback)
        async with self.pool.acquire() as conn:
            first_start = await conn.fetchval(self.sql["first_start"])
            if reread:
                # a row committed after the last whole re-read began (by any process) was
                # stamped at most lookback before (SPEC G3): older rows were all seen by it. Not
                # the cursor: the polls move it on meanwhile, by more than lookback when the
                # re-reads run late (an outage, a busy machine), and a late commit stamped
                # behind it would never be read (found by the chaos soak)
                start = await conn.fetchval(self.sql["reread_from"]) - lookback
            else:  # rows stamped since the last scan: a change committed in time is among them
                start = (await conn.fetchrow(self.sql["cursor"], "live"))["updated_at"]
            if first_start is not None:  # rows from before the first start are the backfill's
                start = max(start, first_start)
            budget = self._live_budget()
            # counted before staging, to send the whole poll to one lane (a single change
            # in the poll after a wave must not find the live lane full of it); the poll stages
            # up to the last key the count saw, so a change committed while a wave is staged
            # page by page is not swept into the wave: the next poll counts it apart
            fresh, until_at, until_id, counted_at = await conn.fetchrow(self._fresh_sql, start, budget + 1)
        if not fresh:
            # the count was a whole scan that found nothing to stage: an idle poll reads the
            # source once (one index probe), and the next re-read starts later all the same
            if reread:
                await self.pool.execute(self.sql["reread_done"], counted_at)
            return True
        wave = fresh > budget
        lane = PACED if wave else LIVE
        last_id: str | None = None
        staged = 0
        while True:
            async with self.pool.acquire() as conn, conn.transaction():
                page = await conn.fetchrow(
                    self._page_sql["live", last_id is not None],
                    start,
                    last_id,
                    PAGE_SIZE,
                    lane,
                    max(budget - result.live_staged, 0),
                    until_at,
                    until_id,
                )
                if page["read"]:
                    # never ahead of the database clock: a row stamped in the future would
                    # otherwise move the cursor past rows still to come
                    await conn.execute(self.sql["advance_live"], page["last_updated_at"])
            result.read += page["read"]
            result.staged += page["staged"]
            self._wake(page["staged"])
            result.live_staged += page["live_staged"]
            staged += page["staged"]
            if lane == LIVE and page["staged"] > page["live_staged"]:  # a wave the count missed
                wave, lane = True, PACED
            if page["read"] < PAGE_SIZE:
                if reread:  # a row committed before the count is at or before the bound: seen
                    await self.pool.execute(self.sql["reread_done"], counted_at)
                break
            start, last_id = page["last_updated_at"], page["last_id"]
        if result.live_staged:
            self._intake.append((time.monotonic(), result.live_staged))
        if wave and staged > result.live_staged:
            result.wave += staged - result.live_staged
            logger.bind(users=result.wave, live_budget=budget).info(
                "wave: {} changes in one poll go to the paced lane; single changes keep going first",
                result.wave,
            )
        return True

    def _live_budget(self) -> int:
        """New versions the live lane may still take in: one batch per quota slot, so that it
        never needs more than the quota (what is left goes to the paced lane)."""
        now = time.monotonic()
        while self._intake and self._intake[0][0] <= now - self.slot:
            self._intake.popleft()
        return max(self.config.limits.batch_size - sum(n for _, n in self._intake), 0)

    async def _sweep_nulls(self, result: PollResult, deadline: float) -> bool:
        """Stage rows with a NULL updated_at not staged yet, walking them by id: one page per
        poll (more while pages stage something, until `deadline`) and only while the paced
        lane has room. True when the sweep has been through every NULL row since this process
        started."""
        if not self.sweep_nulls:
            return True
        waiting: int | None = None
        while True:
            async with self.pool.acquire() as conn, conn.transaction():
                if waiting is None:  # once per poll: see _poll_backfill
                    waiting = int(await conn.fetchval(self.sql["backfill_waiting"], self.lookahead))
                if waiting >= self.lookahead:
                    return False
                page = await conn.fetchrow(
                    self._page_sql["nulls", self._nulls_after is not None],
                    self._nulls_after,
                    PAGE_SIZE,
                    PACED,
                )
            result.read += page["read"]
            result.staged += page["staged"]
            self._wake(page["staged"])
            waiting += page["staged"]
            if page["read"] < PAGE_SIZE:  # the end: the next poll starts over
                self._nulls_after = None
                self._nulls_cycles += 1
                return True
            self._nulls_after = page["last_id"]
            if not page["staged"] or time.monotonic() > deadline:  # the rest: next poll
                return self._nulls_cycles > 0

    async def _poll_backfill(self, result: PollResult, deadline: float) -> bool:
        """Stage the next backfill pages while the lookahead has room, one page at least and
        more until `deadline`. True when finished (for good: an idle poll does not look again).

        The paced lane's waiting users are counted once per poll (a count of up to `lookahead`
        rows: counted again for every page, a backfill's poll was quadratic); the pages staged
        since add to it. Workers taking users meanwhile only make it an overestimate: the lane
        never holds more than the lookahead, and the next poll counts again."""
        waiting: int | None = None
        while not self._backfill_done:
            async with self.pool.acquire() as conn, conn.transaction():
                cursor = await conn.fetchrow(self.sql["cursor"], "backfill")
                if cursor is None or cursor["done"]:
                    self._backfill_done = True
                    return True
                if waiting is None:
                    waiting = int(await conn.fetchval(self.sql["backfill_waiting"], self.lookahead))
                room = min(PAGE_SIZE, self.lookahead - waiting)
                if room <= 0:
                    return False
                page = await conn.fetchrow(
                    self._page_sql["backfill", cursor["last_id"] is not None],
                    cursor["updated_at"],
                    cursor["last_id"],
                    room,
                    BACKFILL,
                    cursor["until_at"],
                    self.config.source.lookback,
                )
                # the end, unless the walk waits for rows stamped within lookback
                finished = page["read"] < room and page["whole"]
                if page["read"] or finished:
                    await conn.execute(
                        self.sql["advance_backfill"],
                        page["last_updated_at"] or cursor["updated_at"],
                        page["last_id"] or cursor["last_id"],
                        finished,
                    )
            result.read += page["read"]
            result.staged += page["staged"]
            self._wake(page["staged"])
            waiting += page["staged"]
            if finished:
                logger.info("backfill finished: every row that existed at the first start is staged")
                self._backfill_done = True
                return True
            if page["read"] < room or time.monotonic() > deadline:
                return False  # (or waiting for rows stamped within lookback) the rest: next poll
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every `poll_interval` until `stop`, and at once when the source table notifies
        (`source.notify_channel`), at most every `notify.MIN_GAP`; a lost database is waited
        out, never fatal. The lookback re-read is not part of these polls: `run_rereads` does
        it, a task of its own."""
        await db.retrying(self.init_cursors, what="init cursors", stop=stop)
        self._cursors_made.set()
        poll = functools.partial(self.poll_once, reread=False)
        notices = listener = None
        if self.config.source.notify_channel:
            notices = notify.ChangeNotices(self.pool, self.config.source)
            listener = asyncio.create_task(notices.run(stop), name="change-listener")
        try:
            await self._every(self.config.source.poll_interval, poll, "poll", stop, notices)
        finally:
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)

    async def run_rereads(self, stop: asyncio.Event) -> None:
        """Re-read the last `lookback` every `reread_every` until `stop`. Apart from the polls:
        after a wave it reads every row of the wave again for `lookback` seconds, and in the
        poll loop that work would hold back the staging of a single change behind it (G11)."""
        if not self.config.source.lookback:
            await stop.wait()
            return
        await self._cursors_made.wait()
        await self._every(self.reread_every, self.reread_once, "lookback re-read", stop)

    @property
    def reread_every(self) -> float:
        """Seconds between lookback re-reads: a late commit is found within this (and a poll);
        a quarter of the lookback, so a wave is read again about four times, not every poll."""
        return max(self.config.source.poll_interval, self.config.source.lookback / 4)

    @staticmethod
    async def _every(
        seconds: float,
        step: Callable[[], Awaitable[PollResult]],
        what: str,
        stop: asyncio.Event,
        notices: notify.ChangeNotices | None = None,
    ) -> None:
        """`step`, then a pause of `seconds` (cut short by a change notification, but no new
        step sooner than `notify.MIN_GAP` after the last began), until `stop`."""
        while not stop.is_set():
            began = time.monotonic()
            if notices is not None:
                notices.changed.clear()  # a notification during this step causes the next
            await db.retrying(step, what=what, stop=stop)
            await quota_wake.sleep(seconds, stop, notices.changed if notices else None)
            # a stream of commits wakes it at most once a gap: one poll takes them all
            gap = min(notify.MIN_GAP, seconds) - (time.monotonic() - began)
            if notices is not None and gap > 0 and not stop.is_set():
                await quota_wake.sleep(gap, stop)
