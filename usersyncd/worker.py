"""SyncUserBatch: one batch end to end, and the worker loop that runs batches.

Order of one attempt: read the users' CURRENT rows, validate, drop what the API already has,
then take a quota slot, read again the rows that changed while waiting for it (so a retry can
never send an older state over a newer one), send. Nothing that can fail on the data runs while
a slot is held, and a batch with nothing left to send never waits for one. A fresh batch is
formed just before its slot frees: it is as full and as fresh as can be.

One row's data never stops the daemon (G14): a value that cannot be decoded or built into a
payload dead-letters its user (kind `error`); any other error confined to one batch spends one of
its attempts and, once they run out, dead-letters the batch's users (kind `error`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import tenacity
from loguru import logger

from usersyncd import api, db, reading, records
from usersyncd.config import Config
from usersyncd.errors import DatabaseError, TransientDeliveryError, UserSyncError
from usersyncd.metrics import Metrics
from usersyncd.queue import Batch, Queue
from usersyncd.quota import Quota, Slot
from usersyncd.source import Source

LIVE = 0  # sync_state.lane of changes since the first start, and of replays
FORM_LEAD = 0.5  # seconds before its slot frees that a fresh batch is formed
FORM_BUDGET = 3.0  # seconds, at most, spent topping up one batch that deduplication empties
FORM_ROUND_MAX = 10_000  # users taken in one top-up round, at most
YIELD_EVERY = 100  # users validated between yields to the event loop
MAX_PAUSE = 24 * 3600.0  # seconds; a Retry-After beyond this is taken as this
BOOKKEEPING_BACKOFF_MAX = 30.0  # seconds between tries to record an accepted batch
# answers that show the API took the key: it judged the records (SPEC §2's "unacceptable" rows)
CREDENTIALS_PROVEN = (400, 409, 413, 422)


class Stopping(UserSyncError):
    """Shutdown was requested; the batch goes back to the queue."""


class _BatchLost(Exception):
    """Another worker took the batch over (its lease ran out): this one lets go of it."""


class _SendAgain(Exception):
    """Sending was paused (429, 401/403): the same users go again, no attempt spent."""


class _BatchError(TransientDeliveryError):
    """Preparing the batch failed on its data (not the database, not the API): an attempt spent."""


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
        self.form_budget = min(FORM_BUDGET, max(self.lead, config.limits.span))
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
        state = self._state = _State(batch)
        if batch is not None and done_before >= attempts:
            # its worker stopped after the last attempt: dead-letter it from that, no request
            await self._dead_letter_rest(
                state,
                batch.last_kind or "exhausted",
                batch.last_error or "retries used up",
                batch.last_status,
            )
            return
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(attempts - done_before),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(TransientDeliveryError),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
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
            except Exception as exc:
                if state.batch is None or not confined(exc):
                    raise
                await self._spend_on_error(state, exc)  # raises _BatchError: tenacity decides

    async def _spend_on_error(self, state: _State, exc: Exception) -> None:
        """An error the batch's data caused while preparing it: one attempt spent, then retried."""
        batch = state.batch
        assert batch is not None
        batch.user_ids = await self.queue.members_of(batch)  # taken, if not yet recorded
        error = _describe(exc)
        self.log.opt(exception=exc).bind(batch_id=batch.id, users=len(batch.user_ids)).error(
            "batch could not be prepared: {}", error[:200]
        )
        await self.queue.spend_attempt(
            batch, next_in=self.config.retry.backoff, status=None, error=error[:500], kind="error"
        )
        raise _BatchError(error) from exc

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
            # read before waiting for a slot: a batch whose users were all sent, deleted or
            # dead-lettered meanwhile needs none, and nothing fails while a slot is held
            members = await self._prepare(state.batch, state.batch.user_ids)
            await self.queue.set_members(state.batch, [m.user_id for m in members])
            if not members:
                await self._finish_empty(state.batch)
                return
            slot = await self.quota.acquire(
                kind=kind,
                batch_id=state.batch.id,
                attempt=attempt_no,
                users=len(members),
                stop=self.stop,
                paced=state.batch.lane != LIVE,
            )
            if slot is None:
                raise Stopping()
        assert state.batch is not None
        try:
            members = await self._refresh(state.batch, members)
        except Exception:
            await self.quota.release(slot)  # a slot is never left granted and unused
            raise
        if not members:
            await self.quota.release(slot)
            await self._finish_empty(state.batch)
            return
        if self.stop.is_set():  # no new request starts after SIGTERM
            await self.quota.release(slot)
            raise Stopping()
        await self._deliver(state, slot, members, attempt_no)

    async def _finish_empty(self, batch: Batch) -> None:
        await self.queue.finish(batch, "done")
        self.log.bind(batch_id=batch.id).debug("batch empty after validation and deduplication")

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
        return slot, members

    async def _form(self, state: _State) -> list[Member]:
        """A new batch of up to `batch_size` ready users (live lane first), topped up when
        validation or deduplication leaves some out: until it is full or no ready user is left,
        for at most `form_budget` seconds (G2 after a bulk touch where few rows really changed)."""
        if not await self.queue.has_ready():  # another worker took them: no empty batch row
            return []
        state.batch = batch = await self.queue.new_batch()
        size = self.config.limits.batch_size
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.form_budget
        members: list[Member] = []
        lanes: dict[str, int] = {}
        taken_so_far = 0
        while len(members) < size:
            ask = form_round(size - len(members), taken_so_far, len(members))
            taken = await self.queue.take_ready(batch, ask)
            if not taken:
                break
            taken_so_far += len(taken)
            lanes.update(taken)
            members += await self._prepare(batch, list(taken))
            if len(taken) < ask or loop.time() >= deadline:
                break
        if len(members) > size:  # a round took more than was needed: the rest wait again
            await self.queue.put_back(batch, [m.user_id for m in members[size:]])
            members = members[:size]
        lane = min((lanes[m.user_id] for m in members), default=LIVE)
        batch.lane = lane
        await self.queue.set_members(batch, [m.user_id for m in members], lane)
        if members:
            self.log.bind(batch_id=batch.id, users=len(members), lane=("live", "backfill")[lane]).info(
                "batch created"
            )
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
        """Read the users now; invalid and unreadable ones to failures, unchanged and missing
        ones out (settled: their failures may resolve)."""
        known = await self.queue.user_state(user_ids)  # before the rows: see Member.seq
        async with self.pool.acquire() as conn:
            rows, unreadable = await reading.fetch(conn, self.source, user_ids)
        members: list[Member] = []
        dropped: dict[str, int] = {}
        settled: dict[str, str] = {}
        for bad in unreadable:  # a value the driver cannot decode: only its user fails (G14)
            await self._unusable(batch, bad.user_id, bad.field, bad.reason)
            dropped[bad.user_id] = known.get(bad.user_id, (None, 0))[1]
        for n, user_id in enumerate(user_ids):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # validation is CPU work: let a request in flight go out
            if user_id in dropped:
                continue
            sent_hash, seq = known.get(user_id, (None, 0))
            row = rows.get(user_id)
            if row is None:  # deleted, or no longer passes the filter
                dropped[user_id] = seq
                settled[user_id] = "gone"
                continue
            try:
                result = records.validate(user_id, row.values, self.config.source.fields)
                digest = None if isinstance(result, records.Invalid) else records.content_hash(result)
            except Exception as exc:  # a row the payload builder cannot take: only its user (G14)
                await self._unusable(batch, user_id, None, f"cannot build the payload: {_describe(exc)}")
                dropped[user_id] = seq
                continue
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
            assert digest is not None
            if sent_hash == digest:  # the API has exactly this already (G4)
                dropped[user_id] = seq
                settled[user_id] = "unchanged"
                continue
            members.append(Member(user_id, result, digest, row.updated_at, seq))
        await self.queue.drop_users(batch, dropped, settled=settled)
        if dropped:  # they are no longer the batch's
            batch.user_ids = [u for u in batch.user_ids if u not in dropped]
        if settled:
            await self._resolve(list(settled))
        return members

    async def _unusable(self, batch: Batch, user_id: str, field: str | None, reason: str) -> None:
        """A user whose row cannot be read or built into a payload: dead-lettered alone."""
        await self.queue.record_failure("error", [user_id], reason, field=field, batch_id=batch.id)
        self.metrics.dead_lettered.labels(kind="error").inc()
        self.log.bind(batch_id=batch.id, user_id=user_id, field=field).error(
            "user dead-lettered: {}", reason[:200]
        )

    async def _resolve(self, user_ids: Sequence[str]) -> None:
        """Resolve these users' failures that are settled now. Bookkeeping: it never fails the
        batch (the pruning pass resolves what this leaves)."""
        try:
            await db.retrying(
                lambda: self.queue.resolve_failures(user_ids), what="resolve failures", stop=self.stop
            )
        except (DatabaseError, asyncpg.PostgresError) as exc:
            self.log.bind(users=len(user_ids), error=str(exc)[:200]).warning(
                "could not resolve failures now; the next pruning pass will"
            )

    async def _deliver(self, state: _State, slot: Slot, members: list[Member], attempt_no: int) -> None:
        """Send `members` on `slot`; splits on 413, sends the rest when the API names bad records."""
        batch = state.batch
        assert batch is not None
        try:
            held = await self.queue.hold(batch)
            # the ledger holds the real start, not the grant
            confirmed = await self.quota.confirm(slot) if held else None
        except Exception:
            await self.quota.release(slot)  # never left granted and unused
            raise
        if not held:  # taken over while the database was away (G6)
            await self.quota.release(slot)
            raise _BatchLost()
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
        if slot.probe and proves_credentials(outcome):
            await self.quota.resume("credentials")
        # a probe answered 5xx, a timeout or 404 proves nothing: the pause stays, the next
        # probe comes at its time
        if kind is api.OutcomeKind.OK:
            await self._record_sent(batch, members)
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

    async def _record_sent(self, batch: Batch, members: Sequence[Member]) -> None:
        """The API accepted `members`: remember it, whatever it takes. Bookkeeping that fails
        after the answer is retried on its own and never sends the batch again (G4)."""
        sent = [(m.user_id, m.hash, m.read_at, m.seq) for m in members]
        delay = 0.2
        while True:
            try:
                # stop=None: a lost database is waited for, even while stopping
                await db.retrying(lambda: self.queue.mark_sent(batch, sent), what="mark sent")
                break
            except Exception as exc:
                self.log.bind(batch_id=batch.id, retry_in=delay, error=str(exc)[:200]).warning(
                    "could not record an accepted batch; retrying (it is not sent again)"
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, BOOKKEEPING_BACKOFF_MAX)
        await self._resolve([m.user_id for m in members])

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
        error = outcome.error or f"HTTP {outcome.status}"
        if outcome.body_excerpt:
            error = f"{error}: {outcome.body_excerpt}"
        await self._dead_letter_users(
            batch,
            kind,
            {m.user_id: m.seq for m in members},
            error,
            http_status=outcome.status,
            attempts=attempt_no,
            request_id=outcome.request_id,
            payload={"subscribers": [m.payload for m in members]},
        )

    async def _dead_letter_users(
        self,
        batch: Batch,
        kind: str,
        seqs: dict[str, int],
        error: str,
        *,
        http_status: int | None,
        attempts: int,
        request_id: str | None = None,
        payload: Any = None,
    ) -> None:
        """Users to failures and out of the batch; the batch fails once none is left in it."""
        ids = list(seqs)
        await self.queue.record_failure(
            kind,
            ids,
            error,
            http_status=http_status,
            attempts=attempts,
            request_id=request_id,
            batch_id=batch.id,
            payload=payload,
        )
        await self.queue.drop_users(batch, seqs)
        self.metrics.dead_lettered.labels(kind=kind).inc(len(ids))
        gone = set(ids)
        batch.user_ids = [u for u in batch.user_ids if u not in gone]
        if not batch.user_ids:
            await self.queue.finish(batch, "failed", http_status=http_status, error=error[:500])
        self.log.bind(batch_id=batch.id, users=len(ids), status=http_status, kind=kind).error(
            "users dead-lettered: {}", error[:200]
        )

    async def _dead_letter_exhausted(self, state: _State, exc: TransientDeliveryError) -> None:
        """Retries used up: what is still unsent goes to failures with the last answer, or the
        last error (kind `error`, G14) when preparing the batch is what failed."""
        cause = exc.__cause__
        if isinstance(cause, _OutcomeError):
            outcome = cause.outcome
            error = outcome.error or f"HTTP {outcome.status}"
            if outcome.body_excerpt:
                error = f"{error}: {outcome.body_excerpt}"
            await self._dead_letter_rest(state, "exhausted", error, outcome.status, outcome.request_id)
        else:
            await self._dead_letter_rest(state, "error", str(exc), None)

    async def _dead_letter_rest(
        self, state: _State, kind: str, error: str, http_status: int | None, request_id: str | None = None
    ) -> None:
        """Every attempt spent: the batch's users still unsent go to failures; no request."""
        batch = state.batch
        if batch is None:
            return
        ids = batch.user_ids or await self.queue.members_of(batch)
        members: list[Member] | None = None
        if kind == "exhausted" and ids:
            try:  # meanwhile unchanged, deleted or invalid users need no dead letter
                members = await self._prepare(batch, ids)
            except Exception as exc:
                if not confined(exc):
                    raise
        if members is not None:
            seqs = {m.user_id: m.seq for m in members}
            payload: Any = {"subscribers": [m.payload for m in members]}
        else:  # preparing is what fails: the users as they are in the batch
            seqs = {u: seq for u, (_, seq) in (await self.queue.user_state(ids)).items()}
            seqs |= {u: 0 for u in ids if u not in seqs}
            payload = None
        if not seqs:
            await self.queue.finish(batch, "done")
            return
        batch.user_ids = list(seqs)
        await self._dead_letter_users(
            batch,
            kind,
            seqs,
            error,
            http_status=http_status,
            attempts=max(batch.attempts, 1),
            request_id=request_id,
            payload=payload,
        )

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


def confined(exc: BaseException) -> bool:
    """An error one batch's data can cause, so that dead-lettering the batch lets the rest go
    on (G14): not the database connection, not an error of usersyncd's own SQL, not a signal."""
    if isinstance(exc, UserSyncError | _BatchLost | _SendAgain) or isinstance(exc, db.CONNECTION_ERRORS):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, asyncpg.DataError)  # SQLSTATE class 22: a value, not the schema
    return isinstance(exc, Exception)


def proves_credentials(outcome: api.Outcome) -> bool:
    """Did the API accept the key? A 2xx, or a 4xx that judged the records (SPEC §2). A 5xx,
    a timeout, 404 (configuration) or 429 says nothing about the key."""
    if outcome.kind is api.OutcomeKind.OK:
        return True
    return outcome.status in CREDENTIALS_PROVEN


def form_round(want: int, taken: int, kept: int) -> int:
    """Users to take in the next round of forming a batch that still wants `want`, after
    `taken` were taken and `kept` of them kept. When deduplication drops most users (a bulk
    `updated_at` touch), rounds grow by the kept share, so a batch fills in a few rounds."""
    if taken == 0 or kept >= taken:
        return want
    if kept == 0:
        return max(want, min(FORM_ROUND_MAX, want * 10))
    return max(want, min(FORM_ROUND_MAX, math.ceil(want * taken / kept)))


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
