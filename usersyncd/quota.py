"""The request quota (SPEC G1, G2): a durable ledger in PostgreSQL, paced inside the process.

At most `limits.requests` requests start in any `limits.window`, kept with a margin: the (N+1)-th
start comes no earlier than `span = window + margin` after the first. The ledger (`requests`, one
row per start, stamped with the database clock) is the authority, shared by restarts, replicas and
`replay-failed`; each grant is one transaction under an advisory lock, so grants are serial.
Pauses (`pauses`) stop every sender of every replica: 429 until a time, 401/403 until a probe works.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, NamedTuple

import asyncpg
from aiolimiter import AsyncLimiter
from loguru import logger

from usersyncd import db
from usersyncd.config import LimitsConfig
from usersyncd.errors import DatabaseError

PauseReason = Literal["rate_limited", "credentials"]
KINDS = ("send", "retry", "replay", "probe")
LEDGER_READ_SLACK = 1.0  # seconds read beyond the span, so grant_delay alone draws the line
ERROR_MAX = 2048  # characters of an error kept in the ledger


def grant_delay(starts: Sequence[float], now: float, limit: int, span: float) -> float:
    """Seconds from `now` until one more request may start; 0.0 if it may start now.

    `starts` are earlier start times (seconds, any epoch). A start holds its slot while
    `start + span > now`; older ones are ignored. With `limit` slots held, the answer is when
    enough of the oldest leave the span: `starts[-limit] + span - now`, always > 0, and a
    request at exactly `now + delay` is granted (no wait longer than needed, G2).
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    held = sorted(start for start in starts if start + span > now)
    if len(held) < limit:
        return 0.0
    frees_at = held[len(held) - limit] + span
    delay = frees_at - now
    # Rounding may leave now + delay a hair short of frees_at: step up until it is not.
    step = math.ulp(max(abs(now), abs(frees_at), delay))
    while now + delay < frees_at:
        delay += step
        step *= 2
    return delay


def pace_delay(grants: Sequence[float], now: float, limit: int, span: float) -> float:
    """Seconds from `now` until a paced request may start: one slot (`span / limit`) after the
    latest grant. Backfill is paced so that it never spends a window's quota in a burst and
    leaves a live change waiting for the window to turn (G11); at the same rate, it uses the
    whole quota (G2)."""
    if not grants:
        return 0.0
    return max(0.0, max(grants) + span / limit - now)


def pace_place(last: float | None, limit: int, span: float) -> float:
    """Where a paced grant made now stands in the pace, relative to now (<= 0): one slot after the
    previous one, so that a grant a little late (a sleep, a transaction) does not push every later
    one back; after a pause of more than a quarter slot, the pace starts again from about now."""
    slot = span / limit
    if last is None:
        return 0.0
    return min(0.0, max(last + slot, -slot / 4))


@dataclass(frozen=True)
class Slot:
    """A granted request start: its ledger row."""

    id: int  # ledger row id
    started_at: datetime
    kind: str  # send | retry | replay | probe (what the caller asked for)
    probe: bool  # granted as the credentials probe: resume() or pause() on its outcome


@dataclass(frozen=True)
class QuotaState:
    """The quota as `status`, metrics and readiness show it."""

    limit: int
    window: float
    used: int  # starts within the last span
    next_free_in: float  # seconds until a slot frees (0: one is free now); pauses aside
    next_paced_in: float  # seconds until a paced (backfill) request may start; pauses aside
    paused: str | None  # 'rate_limited' | 'credentials' | None
    paused_for: float | None  # seconds left of the pause (0: a credentials probe is due)
    pause_detail: str | None


class _Wait(NamedTuple):
    delay: float
    used: int
    paused: str | None


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
    ) -> None:
        self.limits = limits
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
        self._wakeup: asyncio.Event | None = None  # set when a local release/resume frees sending

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
            while not (stop is not None and stop.is_set()):
                wakeup = self._wakeup_event()  # before the look, so no wake-up is missed
                look = functools.partial(self._try_grant, kind, batch_id, attempt, users, paced)
                decision = await db.retrying(look, what="quota.acquire", stop=stop)
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
                logger.bind(
                    kind=kind,
                    batch_id=batch_id,
                    wait_s=round(decision.delay, 3),
                    used=decision.used,
                    limit=self.limit,
                    paused=decision.paused,
                ).debug("quota: waiting for a slot")
                await _sleep(decision.delay, stop, wakeup)
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

        await db.retrying(give_back, what="quota.release")
        self._give_token_back()
        self._wake_waiters()
        logger.bind(slot=slot.id, kind=slot.kind).debug("quota slot released unused")

    async def confirm(self, slot: Slot) -> Slot | None:
        """Re-stamp a granted slot at the moment its request really starts.

        Between the grant and the send, the worker reads and validates the batch; the API counts
        by arrival, so the ledger must hold the real start, not the grant. Moving a stamp later
        is safe while less than a span has passed since the grant: only grants a whole span
        after it consult this row, and they will see the new stamp. Returns the slot with its
        new stamp, or None if a span has passed (the caller releases it and acquires again).
        """

        async def restamp() -> datetime | None:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql["lock_ledger"], self._schema)
                return await conn.fetchval(self._sql["confirm_start"], slot.id, self.span)

        started_at = await db.retrying(restamp, what="quota.confirm")
        if started_at is None:
            return None
        return dataclasses.replace(slot, started_at=started_at)

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
    ) -> None:
        """Store a request's result in its ledger row; believe the API's remaining count if lower.

        The API counts arrivals, and a request has arrived by the time its answer comes: the row's
        stamp moves to no earlier than `margin` before the answer. Whatever delayed the request
        between `confirm()` and the wire (a busy event loop, a new connection) is then covered by
        the margin, and a request that was quick costs nothing.

        The API's `X-RateLimit-Remaining` describes the moment the request arrived, so it is
        compared with what the ledger held when the request started (requests started later may
        already be in flight). What the API counts beyond our own starts is another client's:
        those not yet in the ledger are added as 'external' rows stamped now, so the lower figure
        wins until they leave the span.
        """

        async def store() -> int:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql["lock_ledger"], self._schema)
                held = None
                if rate_limit_remaining is not None:  # counted before this row is re-stamped
                    held = await conn.fetchrow(self._sql["ledger_at"], slot.started_at, self.span)
                await conn.execute(
                    self._sql["record_result"],
                    slot.id,
                    status,
                    outcome,
                    duration_ms,
                    request_id,
                    response_request_id,
                    error[:ERROR_MAX] if error else error,
                    self.span,
                    self.limits.margin,
                )
                if held is None or rate_limit_remaining is None:
                    return 0
                theirs = self.limit - max(rate_limit_remaining, 0) - held["ours"]
                missing = min(theirs - held["external"], self.limit)
                if missing > 0:
                    await conn.execute(self._sql["insert_external"], missing, self._worker)
                return max(missing, 0)

        added = await db.retrying(store, what="quota.record")
        if added:
            logger.bind(
                remaining=rate_limit_remaining,
                external_added=added,
                limit=self.limit,
                slot=slot.id,
            ).warning("the API counts requests of another client on this account; holding back")

    async def pause(self, reason: PauseReason, seconds: float, detail: str) -> None:
        """Stop sending in every replica: `seconds` for a 429; until a probe works for 401/403."""
        if reason not in ("rate_limited", "credentials"):
            raise ValueError(f"unknown pause reason {reason!r}")

        async def upsert() -> tuple[float, int]:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql["lock_ledger"], self._schema)
                remaining = await conn.fetchval(self._sql["upsert_pause"], reason, max(seconds, 0.0), detail)
                _, starts = await conn.fetchrow(self._sql["ledger_window"], self.span)
                return remaining, sum(1 for start in starts if start + self.span > 0)

        remaining, used = await db.retrying(upsert, what="quota.pause")
        entry = logger.bind(
            pause=reason, pause_s=round(remaining, 3), used=used, limit=self.limit, detail=detail
        )
        if reason == "rate_limited":
            entry.warning("sending paused: the API rate-limited us ({}/{} used)", used, self.limit)
        else:
            entry.critical("sending paused: the API rejected the credentials; probing again later")

    async def resume(self, reason: str) -> None:
        """End a pause (its probe got through); logs once if there was one."""

        async def delete() -> asyncpg.Record | None:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(self._sql["lock_ledger"], self._schema)
                return await conn.fetchrow(self._sql["delete_pause"], reason)

        ended = await db.retrying(delete, what="quota.resume")
        if ended is not None:
            self._wake_waiters()
            logger.bind(pause=reason, since=ended["since"].isoformat()).info("sending resumed")

    async def state(self) -> QuotaState:
        """Used slots, the next free one and the pause, as the database sees them now."""

        async def read() -> tuple[list[float], float | None, list[asyncpg.Record]]:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                now, starts = await conn.fetchrow(self._sql["ledger_window"], self.span + LEDGER_READ_SLACK)
                last = await conn.fetchval(self._sql["last_grant"], now, self.span)
                return starts, last, await conn.fetch(self._sql["pauses"], now)

        starts, last_grant, pauses = await db.retrying(read, what="quota.state")
        by_reason = {row["reason"]: row for row in pauses}
        current = by_reason.get("credentials")  # paused until a probe works, even between probes
        rate_limited = by_reason.get("rate_limited")
        if current is None and rate_limited is not None and (rate_limited["remaining"] or 0) > 0:
            current = rate_limited
        return QuotaState(
            limit=self.limit,
            window=self.limits.window,
            used=sum(1 for start in starts if start + self.span > 0),
            next_free_in=grant_delay(starts, 0.0, self.limit, self.span),
            next_paced_in=max(
                grant_delay(starts, 0.0, self.limit, self.span),
                pace_delay([] if last_grant is None else [last_grant], 0.0, self.limit, self.span),
            ),
            paused=current["reason"] if current else None,
            paused_for=max(current["remaining"] or 0.0, 0.0) if current else None,
            pause_detail=current["detail"] if current else None,
        )

    async def prune(self, retention_days: float) -> int:
        """Delete ledger rows older than the retention (never one within the span); how many."""
        keep = max(retention_days * 86400.0, self.span + LEDGER_READ_SLACK)

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
            now, starts = await conn.fetchrow(self._sql["ledger_window"], self.span + LEDGER_READ_SLACK)
            pauses = await conn.fetch(self._sql["pauses"], now)
            used = sum(1 for start in starts if start + self.span > 0)
            pause_left = max((row["remaining"] or 0.0 for row in pauses), default=0.0)
            if any(r["reason"] == "rate_limited" and (r["remaining"] or 0) <= 0 for r in pauses):
                await conn.execute(self._sql["end_rate_limit"], now)
                logger.info("rate-limit pause over")
            delay = max(pause_left, grant_delay(starts, 0.0, self.limit, self.span))
            place = None  # a paced grant's place in the pace, relative to now
            if paced:
                last = await conn.fetchval(self._sql["last_grant"], now, self.span)
                delay = max(delay, pace_delay([] if last is None else [last], 0.0, self.limit, self.span))
                place = pace_place(last, self.limit, self.span)
            if delay > 0:
                paused = next((r["reason"] for r in pauses if (r["remaining"] or 0) > 0), None)
                return _Wait(delay, used, paused)
            probe = any(row["reason"] == "credentials" for row in pauses)
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


async def _sleep(delay: float, *events: asyncio.Event | None) -> None:
    """Sleep `delay` seconds on the event loop, or less if one of `events` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events if event is not None]
    if not waiters:
        await asyncio.sleep(delay)
        return
    try:
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _succeeded(task: asyncio.Future[None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None
