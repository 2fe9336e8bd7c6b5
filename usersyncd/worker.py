"""SyncUserBatch: one batch's delivery and its attempts.

Order of one attempt: read the users' CURRENT rows, validate, drop what the API already has,
then take a quota slot, read again the rows that changed while waiting for it (so a retry can
never send an older state over a newer one), send. Nothing that can fail on the data runs while
a slot is held, and a batch with nothing left to send never waits for one. Forming a fresh batch
and reading users is the former's (`former.py`); what each answer does, the outcome handlers'
(`outcomes.py`).

One row's data never stops the daemon (G14): a value that cannot be decoded or built into a
payload dead-letters its user (kind `error`); any other error confined to one batch spends one of
its attempts and, once they run out, dead-letters the batch's users (kind `error`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import tenacity
from loguru import logger

from usersyncd import api, db, former, outcomes, reading, records
from usersyncd.config import Config
from usersyncd.errors import Stopping, TransientDeliveryError, UserSyncError
from usersyncd.metrics import Metrics
from usersyncd.queue import UNSUBSCRIBE, Batch, Queue, Sent
from usersyncd.quota import Quota, Slot
from usersyncd.source import Source

__all__ = ["Stopping", "SyncUserBatch", "confined"]

BOOKKEEPING_BACKOFF_MAX = 30.0  # seconds between tries to record an accepted batch


class _BatchLost(Exception):
    """Another worker took the batch over (its lease ran out): this one lets go of it."""


class _BatchError(TransientDeliveryError):
    """Preparing the batch failed on its data (not the database, not the API): an attempt spent."""


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
        self.metrics = metrics or Metrics()
        self.queue = queue
        self.quota = quota
        self.client = client
        self.stop = stop
        self.log = logger
        self.former = former.Former(
            config,
            pool=pool,
            source=source,
            queue=queue,
            quota=quota,
            stop=stop,
            forming=forming or asyncio.Lock(),  # shared by the workers of one process
            metrics=self.metrics,
            live_ready=live_ready or asyncio.Event(),  # the poller staged live users
        )
        self._state: former.State | None = None
        self.isolation: outcomes.Isolation | None = None  # the culprits' search under way, if any
        if config.api.probe_path:  # held pauses are probed by a GET, outside the batch quota
            quota.prober = self._probe

    async def run(self, batch: Batch | None) -> None:
        """Deliver `batch` (a reclaimed one), or form a new one when a slot is granted."""
        attempts = self.config.retry.attempts
        done_before = batch.attempts if batch is not None else 0
        state = self._state = former.State(batch)
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

    async def _attempt(self, state: former.State) -> None:
        while True:
            try:
                await self._send_once(state)
                return
            except outcomes.SendAgain:
                continue
            except Exception as exc:
                if state.batch is None or not confined(exc):
                    raise
                await self._spend_on_error(state, exc)  # raises _BatchError: tenacity decides

    async def _spend_on_error(self, state: former.State, exc: Exception) -> None:
        """An error the batch's data caused while preparing it: one attempt spent, then retried."""
        batch = state.batch
        assert batch is not None
        batch.user_ids = await self.queue.members_of(batch)  # taken, if not yet recorded
        error = reading.describe(exc)
        self.log.opt(exception=exc).bind(batch_id=batch.id, users=len(batch.user_ids)).error(
            "batch could not be prepared: {}", error[:200]
        )
        await self.queue.spend_attempt(
            batch, next_in=self.config.retry.backoff, status=None, error=error[:500], kind="error"
        )
        raise _BatchError(error) from exc

    async def _send_once(self, state: former.State) -> None:
        kind = (
            "send"
            if state.batch is None or (state.batch.attempts == 0 and not state.batch.reclaimed)
            else "retry"
        )
        attempt_no = (state.batch.attempts if state.batch else 0) + 1
        if state.batch is None:
            slot, members = await self.former.form_then_acquire(state, kind, attempt_no)
            if slot is None:
                return
        else:
            # read before waiting for a slot: a batch whose users were all sent, deleted or
            # dead-lettered meanwhile needs none, and nothing fails while a slot is held
            members = await self.former.prepare(state.batch, state.batch.user_ids)
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
                paced=state.batch.lane != former.LIVE,
            )
            if slot is None:
                raise Stopping()
        assert state.batch is not None
        try:
            members = await self.former.refresh(state.batch, members)
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

    async def _deliver(
        self, state: former.State, slot: Slot, members: list[former.Member], attempt_no: int
    ) -> None:
        """Send `members` on `slot`; what the answer does is its outcome handler's."""
        batch = state.batch
        assert batch is not None
        try:
            # before the request starts: a rename that lands unanswered is known to be possible
            await self.queue.mark_pending(batch, {m.user_id: m.pending for m in members if m.pending})
            if batch.action == UNSUBSCRIBE:
                await self.queue.mark_unsubscribing(batch, [m.user_id for m in members])
            held = await self.queue.hold(batch)
            # the ledger holds the real start, not the grant
            confirmed = await self.quota.confirm(slot) if held else None
        except Exception:
            await self.quota.release(slot)  # never left granted and unused
            raise
        if not held:  # taken over while the database was away (G6)
            await self.quota.release(slot)
            raise _BatchLost()
        if (
            confirmed is None
            or confirmed.deadline is None
            or (asyncio.get_running_loop().time() >= confirmed.deadline)
        ):  # a whole span passed while forming, or api.timeout while confirming: this slot is stale
            await self.quota.release(slot)
            raise outcomes.SendAgain()
        slot = confirmed
        if self.stop.is_set():  # no new request starts after SIGTERM
            await self.quota.release(slot)
            raise Stopping()
        subscribers = [m.payload for m in members]
        subscribers += [{records.EMAIL: m.also} for m in members if m.also]  # unsubscribes' other email
        outcome = await self.client.send(
            subscribers, batch_id=batch.id, attempt=attempt_no, action=batch.action, deadline=slot.deadline
        )
        await self.quota.record(slot, **outcome.ledger_fields())
        self.metrics.observe_request(outcome.kind.value, outcome.duration_ms)
        log = self.log.bind(
            batch_id=batch.id,
            attempt=f"{attempt_no}/{self.config.retry.attempts}",
            request_id=outcome.request_id,
            users=len(members),
        )
        if slot.probe and outcomes.proves_credentials(outcome):
            await self.quota.resume("credentials")
        if slot.probe and outcome.kind is api.OutcomeKind.OK:
            await self.quota.resume("configuration")
        # a probe answered 5xx, a timeout or 404 proves nothing: the pause stays, the next
        # probe comes at its time
        handler = outcomes.HANDLERS.get(outcome.kind, outcomes.on_transient)
        await handler(self, outcomes.Answer(state, slot, members, outcome, attempt_no, log))

    # -- what outcome handlers call --------------------------------------------------------

    async def record_sent(self, batch: Batch, members: Sequence[former.Member]) -> None:
        """The API accepted `members`: remember it, whatever it takes. Bookkeeping that fails
        after the answer is retried on its own and never sends the batch again (G4)."""
        mark: Callable[[], Awaitable[None]]
        if batch.action == UNSUBSCRIBE:
            mark = functools.partial(self.queue.mark_unsubscribed, batch, {m.user_id: m.seq for m in members})
            self.metrics.unsubscribed.inc(len(members))
        else:
            sent = [
                Sent(m.user_id, m.hash, m.read_at, m.seq, m.email, records.tags_json(m.payload), m.again)
                for m in members
                if m.read_at is not None  # every subscribe has one (only an unsubscribe has none)
            ]
            mark = functools.partial(self.queue.mark_sent, batch, sent)
        delay = 0.2
        while True:
            try:
                # stop=None: a lost database is waited for, even while stopping
                await db.retrying(mark, what="mark sent")
                break
            except Exception as exc:
                self.log.bind(batch_id=batch.id, retry_in=delay, error=str(exc)[:200]).warning(
                    "could not record an accepted batch; retrying (it is not sent again)"
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, BOOKKEEPING_BACKOFF_MAX)
        await self.former.resolve([m.user_id for m in members])

    async def send_part(
        self, state: former.State, part: list[former.Member], attempt_no: int, *, kind: str = "send"
    ) -> None:
        """A part of the batch (a half after 413 or a refusal naming no record, the rest after
        named rejects): its own slot; `kind` "isolate" keeps to `limits.isolate_share`."""
        while True:
            slot = await self.quota.acquire(
                kind=kind,
                batch_id=state.batch.id if state.batch else None,
                attempt=attempt_no,
                stop=self.stop,
            )
            if slot is None:
                raise Stopping()
            try:
                await self._deliver(state, slot, part, attempt_no)
                return
            except outcomes.SendAgain as again:
                if isinstance(again, outcomes.Unwind):  # the whole batch goes again
                    raise
                # after a pause the rows may have changed: read the part again (G3, G4)
                assert state.batch is not None
                part = await self.former.prepare(state.batch, [m.user_id for m in part])
                if not part:
                    if not state.batch.user_ids:
                        await self.queue.finish(state.batch, "done")
                    return

    async def _probe(self) -> bool:
        """A held pause's probe: GET api.probe_path (outside the batch quota); True on a 2xx."""
        probe = await self.client.probe()
        entry = self.log.bind(path=probe.path, status=probe.status, duration_ms=round(probe.duration_ms, 1))
        if probe.ok:
            entry.info("probe: {}", probe.meaning)
        else:
            entry.warning("probe: {}", probe.meaning)
        return probe.ok

    async def dead_letter(
        self, batch: Batch, kind: str, members: Sequence[former.Member], outcome: api.Outcome, attempt_no: int
    ) -> None:
        """These members to failures with the API's answer (a refusal: the renames they started
        did not land, G12)."""
        await self.queue.clear_pending({m.user_id: m.pending for m in members if m.pending})
        await self._dead_letter_users(
            batch,
            kind,
            {m.user_id: m.seq for m in members},
            outcomes.error_text(outcome),
            http_status=outcome.status,
            attempts=attempt_no,
            request_id=outcome.request_id,
            payload=failure_payload(batch, members),
        )

    # -- dead letters ----------------------------------------------------------------------

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

    async def _dead_letter_exhausted(self, state: former.State, exc: TransientDeliveryError) -> None:
        """Retries used up: what is still unsent goes to failures with the last answer, or the
        last error (kind `error`, G14) when preparing the batch is what failed."""
        cause = exc.__cause__
        if isinstance(cause, outcomes.OutcomeError):
            outcome = cause.outcome
            error = outcomes.error_text(outcome)
            await self._dead_letter_rest(state, "exhausted", error, outcome.status, outcome.request_id)
        else:
            await self._dead_letter_rest(state, "error", str(exc), None)

    async def _dead_letter_rest(
        self,
        state: former.State,
        kind: str,
        error: str,
        http_status: int | None,
        request_id: str | None = None,
    ) -> None:
        """Every attempt spent: the batch's users still unsent go to failures; no request."""
        batch = state.batch
        if batch is None:
            return
        ids = batch.user_ids or await self.queue.members_of(batch)
        members: list[former.Member] | None = None
        if kind == "exhausted" and ids:
            try:  # meanwhile unchanged, deleted or invalid users need no dead letter
                members = await self.former.prepare(batch, ids)
            except Exception as exc:
                if not confined(exc):
                    raise
        if members is not None:
            seqs = {m.user_id: m.seq for m in members}
            payload: Any = failure_payload(batch, members)
        else:  # preparing is what fails: the users as they are in the batch
            seqs = {u: known.seq for u, known in (await self.queue.user_state(ids)).items()}
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
        if exc is not None and isinstance(exc.__cause__, outcomes.OutcomeError):
            retry_after = exc.__cause__.outcome.retry_after
        return outcomes.retry_delay(self.config.retry.backoff, retry_after)

    async def _sleep(self, seconds: float) -> None:
        """Wait between attempts on the event loop; a shutdown interrupts it."""
        await former.sleep(self.stop, seconds)

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


def failure_payload(batch: Batch, members: Sequence[former.Member]) -> dict[str, Any]:
    """What a failure keeps of the request: its subscribers, and the action when not a subscribe."""
    payload: dict[str, Any] = {"subscribers": [m.payload for m in members]}
    if batch.action == UNSUBSCRIBE:
        payload["action"] = UNSUBSCRIBE
    return payload


def confined(exc: BaseException) -> bool:
    """An error one batch's data can cause, so that dead-lettering the batch lets the rest go
    on (G14): not the database connection, not an error of usersyncd's own SQL, not a signal."""
    if isinstance(exc, UserSyncError | _BatchLost | outcomes.SendAgain) or isinstance(
        exc, db.CONNECTION_ERRORS
    ):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, asyncpg.DataError)  # SQLSTATE class 22: a value, not the schema
    return isinstance(exc, Exception)
