"""SyncUserBatch: one batch end to end, and the worker loop that runs batches.

Order of one attempt: take a quota slot, then read the users' CURRENT rows (so a retry can
never send an older state over a newer one), validate, drop what the API already has, send.
A fresh batch is formed only once its slot is granted: it is as full and as fresh as can be.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import tenacity
from loguru import logger

from usersyncd import api, records
from usersyncd.config import Config
from usersyncd.errors import TransientDeliveryError, UserSyncError
from usersyncd.metrics import Metrics
from usersyncd.queue import Batch, Queue, lane_name
from usersyncd.quota import Quota, Slot
from usersyncd.source import Source

LIVE = 0  # sync_state.lane of changes since the first start, and of replays
FORM_LEAD = 0.5  # seconds before its slot frees that a fresh batch is formed
FORM_ROUNDS = 10
YIELD_EVERY = 100  # users validated between yields to the event loop  # top-up rounds when validation or deduplication empties part of a batch
MAX_PAUSE = 24 * 3600.0  # seconds; a Retry-After beyond this is taken as this


class Stopping(UserSyncError):
    """Shutdown was requested; the batch goes back to the queue."""


class _BatchLost(Exception):
    """Another worker took the batch over (its lease ran out): this one lets go of it."""


class _SendAgain(Exception):
    """Sending was paused (429, 401/403): the same users go again, no attempt spent."""


@dataclass(frozen=True)
class Member:
    user_id: str
    payload: dict[str, Any]
    hash: bytes
    read_at: datetime  # the row's updated_at when read
    seq: int  # the user's stage_seq when read: staged again since means send again


class SyncUserBatch:
    """One batch: form or refresh it, send it through the quota, retry, dead-letter."""

    def __init__(
        self,
        config: Config,
        *,
        pool: asyncpg.Pool,
        source: Source,
        queue: Queue,
        quota: Quota,
        client: api.ExternalUserApi,
        stop: asyncio.Event,
        forming: asyncio.Lock | None = None,
        metrics: Metrics | None = None,
        live_ready: asyncio.Event | None = None,
    ) -> None:
        self.config = config
        self.forming = forming or asyncio.Lock()  # shared by the workers of one process
        self.metrics = metrics or Metrics()
        self.live_ready = live_ready or asyncio.Event()  # the poller staged live users
        self.lead = min(FORM_LEAD, config.limits.span / 10)
        self.pool = pool
        self.source = source
        self.queue = queue
        self.quota = quota
        self.client = client
        self.stop = stop
        self.log = logger
        self._state: _State | None = None

    async def run(self, batch: Batch | None) -> None:
        """Deliver `batch` (a reclaimed one), or form a new one when a slot is granted."""
        attempts = self.config.retry.attempts
        done_before = batch.attempts if batch is not None else 0
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(max(1, attempts - done_before)),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(TransientDeliveryError),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        state = self._state = _State(batch)
        try:
            async for attempt in retrying:
                with attempt:
                    await self._attempt(state)
        except TransientDeliveryError as exc:
            await self._dead_letter_exhausted(state, exc)
        except Stopping:
            if state.batch is not None:
                await self.queue.release_mine()
            raise
        except _BatchLost:
            self.log.bind(batch_id=state.batch.id if state.batch else None).warning(
                "batch taken over by another worker after its lease ran out; letting go"
            )

    # -- one attempt ---------------------------------------------------------------------

    async def _attempt(self, state: _State) -> None:
        while True:
            try:
                await self._send_once(state)
                return
            except _SendAgain:
                continue

    async def _send_once(self, state: _State) -> None:
        kind = (
            "send"
            if state.batch is None or (state.batch.attempts == 0 and not state.batch.reclaimed)
            else "retry"
        )
        attempt_no = (state.batch.attempts if state.batch else 0) + 1
        if state.batch is None:
            slot, members = await self._form_then_acquire(state, kind, attempt_no)
            if slot is None:
                return
        else:
            slot = await self.quota.acquire(
                kind=kind,
                batch_id=state.batch.id,
                attempt=attempt_no,
                stop=self.stop,
                paced=state.batch.lane != LIVE,
            )
            if slot is None:
                raise Stopping()
            members = await self._prepare(state.batch, state.batch.user_ids)
            await self.queue.set_members(state.batch, [m.user_id for m in members])
        assert state.batch is not None
        if not members:
            await self.quota.release(slot)
            await self.queue.finish(state.batch, "done")
            self.log.bind(batch_id=state.batch.id).debug("batch empty after validation and deduplication")
            return
        if self.stop.is_set():  # no new request starts after SIGTERM
            await self.quota.release(slot)
            raise Stopping()
        await self._deliver(state, slot, members, attempt_no)

    async def _form_then_acquire(
        self, state: _State, kind: str, attempt_no: int
    ) -> tuple[Slot | None, list[Member]]:
        """A fresh batch is formed just before its slot frees, so the slot is used on time (G2);
        and one formed batch at most per process waits for a slot, so users of the live lane
        never queue behind several formed backfill batches (G11)."""
        async with self.forming:
            # paced: a backfill batch goes one slot after the last start; a live user staged
            # meanwhile still makes it into this batch, formed at the end of the wait
            state_now = await self.quota.state()
            wait = max(state_now.next_paced_in, state_now.paused_for or 0.0) - self.lead
            if wait > 0 and await self._live_came(wait):  # raises Stopping on shutdown
                # live users need not wait for the pace: a free slot, if any, is theirs now
                free_in = (await self.quota.state()).next_free_in - self.lead
                if free_in > 0:
                    await self._sleep(free_in)
            members = await self._form(state)
            if not members:
                if state.batch is not None:
                    await self.queue.finish(state.batch, "done")
                return None, []
            assert state.batch is not None
            slot = await self.quota.acquire(
                kind=kind,
                batch_id=state.batch.id,
                attempt=attempt_no,
                users=len(members),
                stop=self.stop,
                paced=state.batch.lane != LIVE,  # live users may use any free slot at once
            )
        if slot is None:
            raise Stopping()
        return slot, await self._refresh(state.batch, members)

    async def _form(self, state: _State) -> list[Member]:
        """A new batch of up to `batch_size` ready users (live lane first), topped up when
        validation or deduplication leaves some out."""
        if not await self.queue.has_ready():  # another worker took them: no empty batch row
            return []
        state.batch = batch = await self.queue.new_batch()
        members: list[Member] = []
        lanes: dict[str, int] = {}
        for _ in range(FORM_ROUNDS):
            want = self.config.limits.batch_size - len(members)
            taken = await self.queue.take_ready(batch, want)
            if not taken:
                break
            lanes.update(taken)
            members += await self._prepare(batch, list(taken))
            if len(taken) < want or len(members) >= self.config.limits.batch_size:
                break
        lane = min((lanes[m.user_id] for m in members), default=LIVE)
        batch.lane = lane
        await self.queue.set_members(batch, [m.user_id for m in members], lane)
        if members:
            self.log.bind(batch_id=batch.id, users=len(members), lane=lane_name(lane)).info("batch created")
        return members

    async def _refresh(self, batch: Batch, members: list[Member]) -> list[Member]:
        """After waiting for the slot: users whose row changed meanwhile are read again."""
        async with self.pool.acquire() as conn:
            versions = await self.source.versions(conn, [m.user_id for m in members])
        changed = {m.user_id for m in members if versions.get(m.user_id) != m.read_at}
        if not changed:
            return members
        fresh = await self._prepare(batch, [m.user_id for m in members if m.user_id in changed])
        kept = [m for m in members if m.user_id not in changed] + fresh
        await self.queue.set_members(batch, [m.user_id for m in kept])
        return kept

    async def _prepare(self, batch: Batch, user_ids: Sequence[str]) -> list[Member]:
        """Read the users now; invalid ones to failures, unchanged and missing ones out."""
        known = await self.queue.user_state(user_ids)  # before the rows: see Member.seq
        async with self.pool.acquire() as conn:
            rows = await self.source.fetch(conn, user_ids)
        members: list[Member] = []
        dropped: dict[str, int] = {}
        gone: list[str] = []
        for n, user_id in enumerate(user_ids):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # validation is CPU work: let a request in flight go out
            sent_hash, seq = known.get(user_id, (None, 0))
            row = rows.get(user_id)
            if row is None:  # deleted, or no longer passes the filter
                dropped[user_id] = seq
                gone.append(user_id)
                continue
            result = records.validate(user_id, row.values, self.config.source.fields)
            if isinstance(result, records.Invalid):
                await self.queue.record_failure(
                    "invalid", [user_id], result.reason, field=result.field, batch_id=batch.id
                )
                self.metrics.dead_lettered.labels(kind="invalid").inc()
                self.log.bind(batch_id=batch.id, user_id=user_id, field=result.field).warning(
                    "invalid record dead-lettered: {}", result.reason
                )
                dropped[user_id] = seq
                continue
            digest = records.content_hash(result)
            if sent_hash == digest:  # the API has exactly this already (G4)
                dropped[user_id] = seq
                continue
            members.append(Member(user_id, result, digest, row.updated_at, seq))
        await self.queue.drop_users(batch, dropped, gone=gone)
        if dropped:  # they are no longer the batch's
            batch.user_ids = [u for u in batch.user_ids if u not in dropped]
        return members

    async def _deliver(self, state: _State, slot: Slot, members: list[Member], attempt_no: int) -> None:
        """Send `members` on `slot`; splits on 413, sends the rest when the API names bad records."""
        batch = state.batch
        assert batch is not None
        if not await self.queue.hold(batch):  # taken over while the database was away (G6)
            await self.quota.release(slot)
            raise _BatchLost()
        confirmed = await self.quota.confirm(slot)  # the ledger holds the real start, not the grant
        if confirmed is None:  # a whole span passed while forming: this slot is stale
            await self.quota.release(slot)
            raise _SendAgain()
        slot = confirmed
        if self.stop.is_set():  # no new request starts after SIGTERM
            await self.quota.release(slot)
            raise Stopping()
        outcome = await self.client.send([m.payload for m in members], batch_id=batch.id, attempt=attempt_no)
        await self.quota.record(slot, **outcome.ledger_fields())
        self.metrics.observe_request(outcome.kind.value, outcome.duration_ms)
        log = self.log.bind(
            batch_id=batch.id,
            attempt=f"{attempt_no}/{self.config.retry.attempts}",
            request_id=outcome.request_id,
            users=len(members),
        )
        kind = outcome.kind
        if kind is api.OutcomeKind.OK:
            if slot.probe:
                await self.quota.resume("credentials")
            await self.queue.mark_sent(batch, [(m.user_id, m.hash, m.read_at, m.seq) for m in members])
            self.metrics.users_synced.inc(len(members))
            sent = {m.user_id for m in members}
            batch.user_ids = [u for u in batch.user_ids if u not in sent]
            if not batch.user_ids:
                await self.queue.finish(batch, "done", http_status=outcome.status)
            log.bind(outcome="ok", status=outcome.status).info("batch delivered")
            return
        if kind is api.OutcomeKind.RATE_LIMITED:
            wait = min(
                self.config.limits.window if outcome.retry_after is None else outcome.retry_after, MAX_PAUSE
            )
            await self.quota.pause("rate_limited", wait, f"HTTP 429; retry in {wait:.1f} s")  # logs WARNING
            raise _SendAgain()
        if kind is api.OutcomeKind.UNAUTHORIZED:
            await self.quota.pause(  # logs CRITICAL
                "credentials", self.config.retry.backoff, f"HTTP {outcome.status}: API credentials refused"
            )
            raise _SendAgain()
        if slot.probe:  # the probe got an answer other than 401/403: credentials work again
            await self.quota.resume("credentials")
        if kind is api.OutcomeKind.TOO_LARGE:
            if len(members) == 1:
                await self._dead_letter(batch, "too_large", members, outcome, attempt_no)
                return
            half = len(members) // 2
            log.bind(outcome="too_large").warning("batch too large; splitting into halves")
            for part in (members[:half], members[half:]):
                await self._send_part(state, part, attempt_no)
            return
        if kind is api.OutcomeKind.REJECTED:
            named = [members[i] for i in outcome.rejected_indices if i < len(members)]
            if named and len(named) < len(members):
                await self._dead_letter(batch, "rejected", named, outcome, attempt_no)
                rest = [m for m in members if m not in named]
                await self._send_part(state, rest, attempt_no)
                return
            await self._dead_letter(batch, "rejected", members, outcome, attempt_no)
            return
        # transient: the attempt is spent (persisted, so a restart continues the count);
        # tenacity decides whether another comes
        await self.queue.spend_attempt(
            batch,
            next_in=retry_delay(self.config.retry.backoff, outcome.retry_after),
            status=outcome.status,
            error=(outcome.error or "")[:500],
        )
        raise TransientDeliveryError(outcome.error or f"HTTP {outcome.status}") from _OutcomeError(outcome)

    async def _send_part(self, state: _State, part: list[Member], attempt_no: int) -> None:
        """A part of the batch (a half after 413, the rest after named rejects): its own slot."""
        while True:
            slot = await self.quota.acquire(
                kind="send",
                batch_id=state.batch.id if state.batch else None,
                attempt=attempt_no,
                stop=self.stop,
            )
            if slot is None:
                raise Stopping()
            try:
                await self._deliver(state, slot, part, attempt_no)
                return
            except _SendAgain:
                # after a pause the rows may have changed: read the part again (G3, G4)
                assert state.batch is not None
                part = await self._prepare(state.batch, [m.user_id for m in part])
                if not part:
                    if not state.batch.user_ids:
                        await self.queue.finish(state.batch, "done")
                    return

    async def _dead_letter(
        self, batch: Batch, kind: str, members: Sequence[Member], outcome: api.Outcome, attempt_no: int
    ) -> None:
        ids = [m.user_id for m in members]
        error = outcome.error or f"HTTP {outcome.status}"
        if outcome.body_excerpt:
            error = f"{error}: {outcome.body_excerpt}"
        await self.queue.record_failure(
            kind,
            ids,
            error,
            http_status=outcome.status,
            attempts=attempt_no,
            request_id=outcome.request_id,
            batch_id=batch.id,
            payload={"subscribers": [m.payload for m in members]},
        )
        await self.queue.drop_users(batch, {m.user_id: m.seq for m in members})
        self.metrics.dead_lettered.labels(kind=kind).inc(len(ids))
        gone = set(ids)
        batch.user_ids = [u for u in batch.user_ids if u not in gone]
        if not batch.user_ids:
            await self.queue.finish(batch, "failed", http_status=outcome.status, error=error[:500])
        self.log.bind(batch_id=batch.id, users=len(ids), status=outcome.status, kind=kind).error(
            "users dead-lettered: {}", error[:200]
        )

    async def _dead_letter_exhausted(self, state: _State, exc: TransientDeliveryError) -> None:
        """Retries used up: what is still unsent goes to failures with the last answer."""
        batch = state.batch
        if batch is None:
            return
        members = await self._prepare(batch, batch.user_ids) if batch.user_ids else []
        if not members:  # meanwhile unchanged, deleted or invalid: nothing left to dead-letter
            await self.queue.finish(batch, "done")
            return
        batch.user_ids = [m.user_id for m in members]
        cause = exc.__cause__
        assert isinstance(cause, _OutcomeError)
        await self._dead_letter(batch, "exhausted", members, cause.outcome, batch.attempts)

    # -- retry policy --------------------------------------------------------------------

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        """`retry.backoff` between attempts, longer if the API sent Retry-After."""
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = None
        if exc is not None and isinstance(exc.__cause__, _OutcomeError):
            retry_after = exc.__cause__.outcome.retry_after
        return retry_delay(self.config.retry.backoff, retry_after)

    async def _live_came(self, seconds: float) -> bool:
        """Wait `seconds`, or less if live users are waiting or the poller stages some (True then)."""
        self.live_ready.clear()  # before looking: a poll staging after the look sets it again
        if await self.queue.has_live_ready():
            return True
        waiters = {asyncio.ensure_future(self.stop.wait()), asyncio.ensure_future(self.live_ready.wait())}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if self.stop.is_set():
            raise Stopping()
        return self.live_ready.is_set()

    async def _sleep(self, seconds: float) -> None:
        """Wait between attempts on the event loop; a shutdown interrupts it."""
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise Stopping()

    async def _log_retry(self, retry_state: tenacity.RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
        batch = self._state.batch if self._state else None
        self.metrics.retries.inc()
        self.log.bind(
            batch_id=batch.id if batch else None,
            attempt=f"{batch.attempts if batch else retry_state.attempt_number}/{self.config.retry.attempts}",
            retry_in=round(wait, 3),
            cause=str(exc)[:200],
        ).warning("batch attempt failed; retrying")


def retry_delay(backoff: float, retry_after: float | None) -> float:
    """Seconds before the next attempt: the backoff, or the API's Retry-After when longer."""
    if retry_after is None:
        return backoff
    return max(backoff, min(retry_after, MAX_PAUSE))


class _OutcomeError(Exception):
    def __init__(self, outcome: api.Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


@dataclass
class _State:
    batch: Batch | None
