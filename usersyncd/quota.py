"""The request quota (SPEC G1, G2): a durable ledger in PostgreSQL, paced inside the process.

At most `limits.requests` requests start in any `limits.window`, kept with a margin: the (N+1)-th
start comes no earlier than `span = window + margin` after the first. The ledger (`requests`, one
row per start, stamped with the database clock) is the authority, shared by restarts, replicas and
`replay-failed`; each grant is one transaction under an advisory lock, so grants are serial.
Pauses (`pauses`) stop every sender of every replica: 429 until a time, 401/403 until a probe works;
a slot granted before a pause is not sent into it (`confirm`). Another client on the same account
shows in the API's X-RateLimit-Remaining: what it uses is left to it (`quota_math.learnt_others`).
A request whose answer is not recorded yet keeps its slot as if it arrived now (it may still), up to
its deadline: the margin covers the delay from stamp to arrival however long the answer takes.
The arithmetic is in `quota_math`; waking waiters of other processes in `quota_wake`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, NamedTuple

import asyncpg
from aiolimiter import AsyncLimiter
from loguru import logger

from usersyncd import db, quota_math, quota_wake
from usersyncd.config import LimitsConfig
from usersyncd.errors import DatabaseError

# the arithmetic, where callers and tests have always found it
grant_delay = quota_math.grant_delay
pace_delay = quota_math.pace_delay
pace_place = quota_math.pace_place

PauseReason = Literal["rate_limited", "credentials", "configuration"]
KINDS = ("send", "retry", "replay", "probe", "isolate")  # isolate: a half of a batch refused whole
HELD = quota_math.HELD  # pauses held until a probe works
LEDGER_READ_SLACK = 1.0  # seconds read beyond the span, so grant_delay alone draws the line
ERROR_MAX = 2048  # characters of an error kept in the ledger


@dataclass(frozen=True)
class Slot:
    """A granted request start: its ledger row."""

    id: int  # ledger row id
    started_at: datetime
    kind: str  # send | retry | replay | probe (what the caller asked for)
    probe: bool  # granted as the credentials probe: resume() or pause() on its outcome
    # set by confirm(): the event loop's time by which the request must be over (the sender's
    # deadline); it runs from before the stamp, so the request arrives within request_timeout of it
    deadline: float | None = None


@dataclass(frozen=True)
class QuotaState:
    """The quota as `status`, metrics and readiness show it."""

    limit: int
    window: float
    used: int  # starts within the last span, and those of other clients on the account (`others`)
    next_free_in: float  # seconds until a slot frees (0: one is free now); pauses aside
    next_paced_in: float  # seconds until a paced (backfill) request may start; pauses aside
    paused: str | None  # 'rate_limited' | 'credentials' | 'configuration' | None
    paused_for: float | None  # seconds left of the pause (0: a credentials probe is due)
    pause_detail: str | None
    others: int = 0  # requests per span left to another client on the account (X-RateLimit-Remaining)


class _ProbeDue(NamedTuple):
    """A held pause is due for its probe, and this acquirer makes it (a GET of api.probe_path)."""


class _Wait(NamedTuple):
    delay: float
    used: int
    paused: str | None
    others: int


class Quota:
    """Grants request slots from the ledger; records outcomes; pauses and resumes sending.

    Counters for the metrics endpoint (monotonic, never reset):
      granted: slots granted by acquire(), probes included;
      waits: acquire() calls that could not start at once;
      wait_seconds: seconds those calls spent waiting (in the limiter, on the ledger or a pause).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        limits: LimitsConfig,
        schema: str,
        *,
        worker: str,
        credentials_probe_every: float,
        request_timeout: float,
    ) -> None:
        self.limits = limits
        # api.timeout: a request arrives, if at all, by then after its stamp (the sender's deadline
        # runs from before confirm()); until its answer is recorded it keeps its slot up to then
        self.request_timeout = request_timeout
        self.limit = limits.requests
        self.span = limits.span
        self.granted = 0
        self.waits = 0
        self.wait_seconds = 0.0
        self._pool = pool
        self._schema = schema
        self._worker = worker
        self._probe_every = credentials_probe_every
        self._sql = db.queries("quota", schema)
        # In-process pacing only; the ledger keeps the limit. A leaky bucket of N per span admits
        # every sequence with at most N starts in any span (such a sequence has at most
        # N + N*t/span starts in any t seconds: the bucket's capacity plus its drain). Its tokens
        # are taken before the ledger rows they pace, and tokens of slots never used go back
        # (`_spare_tokens`), so whenever the ledger would grant this process a slot the bucket has
        # a token too: it cannot delay a start beyond the ledger. What it does: surplus waiters
        # queue here in order instead of all polling the database.
        self._limiter: AsyncLimiter | None = None  # created inside the running loop
        self._spare_tokens = 0
        self._wakeup: asyncio.Event | None = None  # set when a release/resume frees sending
        self._wakeups = quota_wake.Wakeups(pool, schema, self._wake_waiters)  # other processes'
        self._ignored_limit: int | None = None  # an X-RateLimit-Limit already warned about
        # a GET of api.probe_path (True: 2xx): while set, held pauses are probed by it, outside
        # the batch quota, instead of by a batch request
        self.prober: Callable[[], Awaitable[bool]] | None = None

    async def acquire(
        self,
        *,
        kind: str,
        batch_id: int | None = None,
        attempt: int | None = None,
        users: int | None = None,
        stop: asyncio.Event | None = None,
        paced: bool = False,
    ) -> Slot | None:
        """Wait for a slot and take it (one ledger row); None if `stop` is set first.

        `paced`: also wait one slot (`span / requests`) after the latest start (backfill)."""
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r}")
        loop = asyncio.get_running_loop()
        began = loop.time()
        waited = False
        token = False
        try:
            if stop is not None and stop.is_set():
                return None
            token, waited = await self._take_token(stop)
            if not token:
                return None
            async with contextlib.AsyncExitStack() as listening:
                heard = False  # whether other processes' notifications reach this acquire
                while not (stop is not None and stop.is_set()):
                    wakeup = self._wakeup_event()  # before the look, so no wake-up is missed
                    look = functools.partial(self._try_grant, kind, batch_id, attempt, users, paced)
                    decision = await db.retrying(look, what="quota.acquire", stop=stop)
                    if isinstance(decision, _ProbeDue):
                        await self._probe_by_get()
                        continue
                    if isinstance(decision, Slot):
                        token = False  # spent on this start
                        self.granted += 1
                        logger.bind(
                            slot=decision.id,
                            kind=kind,
                            batch_id=batch_id,
                            probe=decision.probe,
                            waited_s=round(loop.time() - began, 3),
                        ).debug("quota slot granted")
                        return decision
                    waited = True
                    if not heard:  # from now on other processes' releases wake this one
                        heard = True
                        await listening.enter_async_context(self._wakeups.waiting(stop))
                        continue  # look again: what they freed before LISTEN is in the ledger
                    logger.bind(
                        kind=kind,
                        batch_id=batch_id,
                        wait_s=round(decision.delay, 3),
                        used=decision.used,
                        limit=self.limit,
                        others=decision.others,
                        paused=decision.paused,
                    ).debug("quota: waiting for a slot")
                    delay = decision.delay
                    if not self._wakeups.listening:  # a release elsewhere would go unnoticed
                        delay = min(delay, quota_wake.RECHECK)
                    await quota_wake.sleep(delay, stop, wakeup)
            return None
        except DatabaseError:
            if stop is not None and stop.is_set():
                return None  # the database went away during shutdown: no request starts
            raise
        finally:
            if token:
                self._give_token_back()
            if waited:
                self.waits += 1
                self.wait_seconds += loop.time() - began

    async def release(self, slot: Slot) -> None:
        """Give back a slot that was not used (nothing left to send): it is free at once."""

        async def give_back() -> None:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql["lock_ledger"], self._schema)
                await conn.execute(self._sql["delete_start"], slot.id)
                if slot.probe:
                    await conn.execute(self._sql["reopen_probe"])
                await conn.execute(self._sql["notify_freed"], self._schema)  # other processes' waiters

        await db.retrying(give_back, what="quota.release")
        self._give_token_back()
        self._wake_waiters()
        logger.bind(slot=slot.id, kind=slot.kind).debug("quota slot released unused")

    async def confirm(self, slot: Slot) -> Slot | None:
        """Re-stamp a granted slot at the moment its request really starts; None if it must not.

        Between the grant and the send, the worker reads and validates the batch; the API counts
        by arrival, so the ledger must hold the real start, not the grant. Moving a stamp later
        is safe while less than a span has passed since the grant: only grants a whole span
        after it consult this row, and they will see the new stamp. None (the caller releases
        the slot and acquires again, which waits) if a span has passed, or if a pause began
        since the grant (a 429 or 401/403 that another worker or replica met meanwhile): the
        request is not sent into it. Under the ledger lock, as pause() is: one comes first.
        The returned slot's `deadline` is when its request must be over (`request_timeout` from
        before the new stamp): the ledger relies on no arrival later than that.
        """
        deadline = asyncio.get_running_loop().time() + self.request_timeout

        async def restamp() -> tuple[datetime | None, str | None]:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql["lock_ledger"], self._schema)
                pauses = await conn.fetch(self._sql["pauses"], None)
                refused = quota_math.pause_refuses(
                    ((row["reason"], row["remaining"]) for row in pauses), slot.probe
                )
                if refused is not None:
                    return None, refused
                return await conn.fetchval(self._sql["confirm_start"], slot.id, self.span), None

        started_at, paused = await db.retrying(restamp, what="quota.confirm")
        if started_at is None:
            logger.bind(slot=slot.id, kind=slot.kind, paused=paused).debug(
                "quota slot not confirmed: {}", "sending paused since the grant" if paused else "stale"
            )
            return None
        return dataclasses.replace(slot, started_at=started_at, deadline=deadline)

    async def record(
        self,
        slot: Slot,
        *,
        status: int | None,
        outcome: str,
        duration_ms: float,
        request_id: str | None,
        response_request_id: str | None,
        error: str | None,
        rate_limit_remaining: int | None = None,
        rate_limit_limit: int | None = None,
    ) -> None:
        """Store a request's result in its ledger row, and what it says of other clients.

        The API counts arrivals, and a request has arrived by the time its answer comes, and by
        its deadline (`request_timeout` after its stamp): the row's stamp moves to no earlier than
        `margin` before the earlier of the two. Whatever delayed the request between `confirm()`
        and the wire (a busy event loop, a new connection) is then covered by the margin, however
        long the answer took, and a request that was quick costs nothing. Until this is recorded,
        the row holds its slot as a request that may arrive now (`_ledger_window`).

        The API's `X-RateLimit-Remaining` describes its window when the request arrived: what it
        counts beyond our own starts in that window is other clients' (`others`, kept in the row;
        not believed if `X-RateLimit-Limit` names another limit). Grants leave them room
        (`quota_math.learnt_others`) until responses show more room.
        """

        async def store() -> tuple[int | None, int, int]:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql["lock_ledger"], self._schema)
                others = before = None
                if rate_limit_remaining is not None:  # counted before this row is re-stamped
                    ours = await conn.fetchval(self._sql["ours_at"], slot.started_at, self.limits.window)
                    others = quota_math.others_seen(self.limit, rate_limit_remaining, rate_limit_limit, ours)
                if others is not None:
                    before, _ = await self._learnt(conn)
                await conn.execute(
                    self._sql["record_result"],
                    slot.id,
                    status,
                    outcome,
                    duration_ms,
                    request_id,
                    response_request_id,
                    error[:ERROR_MAX] if error else error,
                    self.request_timeout,
                    self.limits.margin,
                    rate_limit_remaining,
                    rate_limit_limit,
                    others,
                )
                if others is None or before is None:
                    return others, 0, 0
                after, _ = await self._learnt(conn)
                if after < before:  # more room: waiters here and elsewhere may start earlier
                    await conn.execute(self._sql["notify_freed"], self._schema)
                return others, before, after

        others, before, after = await db.retrying(store, what="quota.record")
        entry = logger.bind(
            remaining=rate_limit_remaining,
            others=others,
            limit=self.limit,
            slot=slot.id,
            budget=quota_math.budget(self.limit, after),
        )
        if after > before:
            entry.warning("the API counts requests of another client on this account; holding back")
        elif after < before:
            self._wake_waiters()
            entry.info("the API shows more room on the shared account; sending faster")
        if others is None and rate_limit_remaining is not None and rate_limit_limit != self._ignored_limit:
            self._ignored_limit = rate_limit_limit
            logger.bind(api_limit=rate_limit_limit, limit=self.limit).warning(
                "X-RateLimit-Limit {} is not limits.requests {}: X-RateLimit-Remaining describes another"
                " limit and is ignored",
                rate_limit_limit,
                self.limit,
            )

    async def pause(self, reason: PauseReason, seconds: float, detail: str) -> None:
        """Stop sending in every replica: `seconds` for a 429; until a probe works for 401/403
        (credentials) and for a 404 or a refusal no record explains (configuration)."""
        if reason not in ("rate_limited", *HELD):
            raise ValueError(f"unknown pause reason {reason!r}")

        async def upsert() -> tuple[float, bool, int]:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql["lock_ledger"], self._schema)
                remaining, fresh = await conn.fetchrow(
                    self._sql["upsert_pause"], reason, max(seconds, 0.0), detail
                )
                _, starts = await self._ledger_window(conn, self.span)
                return remaining, fresh, sum(1 for start in starts if start + self.span > 0)

        remaining, fresh, used = await db.retrying(upsert, what="quota.pause")
        entry = logger.bind(
            pause=reason, pause_s=round(remaining, 3), used=used, limit=self.limit, detail=detail
        )
        if reason == "rate_limited":
            entry.warning("sending paused: the API rate-limited us ({}/{} used)", used, self.limit)
        elif reason == "configuration":  # CRITICAL once: other workers meet the same answer
            (entry.critical if fresh else entry.info)(
                "sending paused: the API refuses the configuration ({}); probing again later", detail
            )
        else:
            entry.critical("sending paused: the API rejected the credentials; probing again later")

    async def resume(self, reason: str) -> None:
        """End a pause (its probe got through); logs once if there was one."""

        async def delete() -> asyncpg.Record | None:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql["lock_ledger"], self._schema)
                ended = await conn.fetchrow(self._sql["delete_pause"], reason)
                if ended is not None:  # other processes' waiters may start now
                    await conn.execute(self._sql["notify_freed"], self._schema)
                return ended

        ended = await db.retrying(delete, what="quota.resume")
        if ended is not None:
            self._wake_waiters()
            logger.bind(pause=reason, since=ended["since"].isoformat()).info("sending resumed")

    async def state(self) -> QuotaState:
        """Used slots, the next free one and the pause, as the database sees them now."""

        async def read() -> tuple[list[float], float | None, list[asyncpg.Record], int]:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                now, starts = await self._ledger_window(conn)
                last = await conn.fetchval(self._sql["last_grant"], now, self.span)
                others, _ = await self._learnt(conn, now)
                return starts, last, await conn.fetch(self._sql["pauses"], now), others

        starts, last_grant, pauses, others = await db.retrying(read, what="quota.state")
        allowed = quota_math.budget(self.limit, others)
        by_reason = {row["reason"]: row for row in pauses}
        # paused until a probe works, even between probes
        current = by_reason.get("credentials") or by_reason.get("configuration")
        rate_limited = by_reason.get("rate_limited")
        if current is None and rate_limited is not None and (rate_limited["remaining"] or 0) > 0:
            current = rate_limited
        return QuotaState(
            limit=self.limit,
            window=self.limits.window,
            used=sum(1 for start in starts if start + self.span > 0) + others,
            next_free_in=grant_delay(starts, 0.0, allowed, self.span),
            next_paced_in=max(
                grant_delay(starts, 0.0, allowed, self.span),
                pace_delay([] if last_grant is None else [last_grant], 0.0, allowed, self.span),
            ),
            paused=current["reason"] if current else None,
            paused_for=max(current["remaining"] or 0.0, 0.0) if current else None,
            pause_detail=current["detail"] if current else None,
            others=others,
        )

    async def prune(self, retention_days: float) -> int:
        """Delete ledger rows older than the retention (never one within the span); how many."""
        keep = max(retention_days * 86400.0, self.span + self.request_timeout + LEDGER_READ_SLACK)

        async def delete() -> int:
            async with self._pool.acquire() as conn:
                return await conn.fetchval(self._sql["prune"], keep)

        pruned = await db.retrying(delete, what="quota.prune")
        if pruned:
            logger.bind(rows=pruned, retention_days=retention_days).info("request log pruned")
        return pruned

    async def _try_grant(
        self, kind: str, batch_id: int | None, attempt: int | None, users: int | None, paced: bool = False
    ) -> Slot | _Wait:
        """One transaction under the lock: a slot now, or how long to wait for one."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(self._sql["lock_ledger"], self._schema)
            # Read after the lock: every grant committed before it is visible, and it is older.
            now, starts = await self._ledger_window(conn)
            pauses = await conn.fetch(self._sql["pauses"], now)
            used = sum(1 for start in starts if start + self.span > 0)
            pause_left = max((row["remaining"] or 0.0 for row in pauses), default=0.0)
            if any(r["reason"] == "rate_limited" and (r["remaining"] or 0) <= 0 for r in pauses):
                await conn.execute(self._sql["end_rate_limit"], now)
                logger.info("rate-limit pause over")
            others, drop_in = await self._learnt(conn, now)  # another client's share of the account
            allowed = quota_math.budget(self.limit, others)
            ledger_delay = grant_delay(starts, 0.0, allowed, self.span)
            place = None  # a paced grant's place in the pace, relative to now
            if paced:
                last = await conn.fetchval(self._sql["last_grant"], now, self.span)
                ledger_delay = max(
                    ledger_delay, pace_delay([] if last is None else [last], 0.0, allowed, self.span)
                )
                place = pace_place(last, allowed, self.span)
            if drop_in is not None:  # the other client's share may shrink before then: look again
                ledger_delay = min(ledger_delay, drop_in)
            delay = max(pause_left, ledger_delay)
            if kind == "isolate":  # the culprits' search keeps to its share (limits.isolate_share)
                isolating = await conn.fetchval(
                    self._sql["isolate_window"], now, self.span + LEDGER_READ_SLACK
                )
                share = self.limits.isolate_share
                delay = max(delay, quota_math.isolate_delay(isolating, 0.0, allowed, share, self.span))
            held = [row for row in pauses if row["reason"] in HELD]
            if held and self.prober is not None:  # a GET probes when due, never a slot
                if max(row["remaining"] or 0.0 for row in held) <= 0:
                    await conn.execute(self._sql["schedule_probe"], self._probe_every)
                    return _ProbeDue()
                delay = max(delay, max(row["remaining"] or 0.0 for row in held))
            if delay > 0:
                paused = next((r["reason"] for r in pauses if (r["remaining"] or 0) > 0), None)
                return _Wait(delay, used, paused, others)
            probe = bool(held)
            if probe:  # the pause is due for a probe: this request is it, the next one later
                await conn.execute(self._sql["schedule_probe"], self._probe_every)
            row = await conn.fetchrow(
                self._sql["insert_start"], kind, batch_id, attempt, users, self._worker, place
            )
        if probe:
            logger.bind(slot=row["id"], kind=kind, batch_id=batch_id).info(
                "credentials probe: this request tests the API key"
            )
        return Slot(id=row["id"], started_at=row["started_at"], kind=kind, probe=probe)

    async def _probe_by_get(self) -> None:
        """Make a due probe with `prober` (a GET outside the batch quota); a 2xx ends the held
        pauses, anything else leaves them until the next probe, `retry.backoff` later."""
        assert self.prober is not None
        try:
            ok = await self.prober()
        except Exception as exc:  # the probe itself failing proves nothing
            logger.bind(error=str(exc)[:200]).warning("probe failed")
            ok = False
        if ok:
            for reason in HELD:
                await self.resume(reason)

    async def _ledger_window(
        self, conn: asyncpg.Connection, seconds: float | None = None
    ) -> tuple[datetime, list[float]]:
        """The database clock, and the starts of the last `seconds` (default: the span and a
        little more) relative to it; a request with no answer yet counts as starting as late as
        it may still arrive (less the margin), up to its deadline."""
        read = self.span + LEDGER_READ_SLACK if seconds is None else seconds
        now, starts = await conn.fetchrow(
            self._sql["ledger_window"], read, self.request_timeout, self.limits.margin
        )
        return now, starts

    async def _learnt(
        self, conn: asyncpg.Connection, now: datetime | None = None
    ) -> tuple[int, float | None]:
        """Requests per span left to other clients on the account, and when that may drop (s)."""
        times, counts = await conn.fetchrow(self._sql["others_seen"], now, self.span)
        return quota_math.learnt_others(zip(times, counts, strict=True), 0.0, self.limit, self.span)

    async def aclose(self) -> None:
        """Stop listening for other processes' wake-ups (also stops by itself when nobody waits)."""
        await self._wakeups.aclose()

    async def _take_token(self, stop: asyncio.Event | None) -> tuple[bool, bool]:
        """(got a limiter token, had to wait for it); no token when `stop` came first."""
        if self._spare_tokens:
            self._spare_tokens -= 1
            return True, False
        if self._limiter is None:
            self._limiter = AsyncLimiter(self.limit, self.span)
        if self._limiter.has_capacity():
            await self._limiter.acquire()  # returns at once: never suspends with capacity
            return True, False
        if stop is None:
            await self._limiter.acquire()  # a cancelled acquire takes no token (aiolimiter)
            return True, True
        task = asyncio.ensure_future(self._limiter.acquire())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            if _succeeded(task):  # cancelled just as the token came: keep it for the next one
                self._give_token_back()
            raise
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
        return _succeeded(task), True

    def _give_token_back(self) -> None:
        """A limiter token whose slot was never used serves the next acquire (no refund API)."""
        self._spare_tokens = min(self._spare_tokens + 1, self.limit)

    def _wakeup_event(self) -> asyncio.Event:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        return self._wakeup

    def _wake_waiters(self) -> None:
        """Local waiters look at the ledger again now (other processes at their next look)."""
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None


def _succeeded(task: asyncio.Future[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None
