"""The former: which users go in the next batch, in which lane, and when it waits for its slot.

A fresh batch is formed just before its slot frees (it is as full and as fresh as can be), one
per process at a time, so live users never queue behind formed backfill batches (G11). Reading
users (`prepare`) is also here: invalid and unreadable rows go to failures, unchanged and
missing ones leave the batch (G4, G14), and what is left is a list of `Member`s to send.

With `source.on_delete = "unsubscribe"` (G12) a batch is a subscribe batch or an unsubscribe
batch (`Batch.action`), never both: the endpoints differ. A user whose row is gone (deleted or
filtered out) and whom the API holds (an email it accepted, not unsubscribed since) is sent in
an unsubscribe batch; a row found missing in a subscribe batch, or back in an unsubscribe batch,
leaves it still dirty, marked for the other kind (`Queue.move_users`). Both kinds go through the
same queue, ledger, retries and outcome handlers, one open batch per user (G1, G6).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg
from loguru import logger

from usersyncd import db, reading, records
from usersyncd.config import Config
from usersyncd.errors import DatabaseError, Stopping
from usersyncd.metrics import Metrics
from usersyncd.queue import UNSUBSCRIBE, Batch, Known, Queue, lane_name
from usersyncd.quota import Quota, Slot
from usersyncd.source import Source

LIVE = 0  # sync_state.lane of changes since the first start, and of replays
FORM_LEAD = 0.5  # seconds before its slot frees that a fresh batch is formed
FORM_BUDGET = 3.0  # seconds, at most, spent topping up one batch that deduplication empties
FORM_ROUND_MAX = 10_000  # users taken in one top-up round, at most
YIELD_EVERY = 100  # users validated between yields to the event loop
NEVER_KNOWN: Known = Known(None, 0, records.NEVER_SENT)  # a user sync_state has no row for
ACTIVE = {"status": "active"}  # Drip re-subscribes an unsubscribed subscriber only when told (SPEC §2)


class Member(NamedTuple):  # a tuple: one per user sent, ~5x cheaper to make than a frozen dataclass
    user_id: str
    payload: dict[str, Any]  # the body sent: the row's, as a rename and with remove_tags if need be
    # of the row's payload (G4): what the user's data is, whatever the body; b"" for an unsubscribe
    hash: bytes
    read_at: str | None  # the row's version when read (`Source.version_sql`; None: no row, an unsubscribe)
    seq: int  # the user's stage_seq when read: staged again since means send again
    email: str  # the email the API keys the subscriber by once this is accepted (G12)
    pending: str | None  # a rename this body starts: kept before sending, dropped if refused
    again: bool  # `email` is not the row's yet: the user goes once more
    also: str | None = None  # an unsubscribe's other email: a rename sent, never answered (G12)


@dataclass
class State:
    """The batch one job works on; set as soon as forming creates it, so that an error while
    forming is charged to it."""

    batch: Batch | None


class Former:
    """Forms batches and reads their users; shares `forming` with the other workers of the process."""

    def __init__(
        self,
        config: Config,
        *,
        pool: asyncpg.Pool,
        source: Source,
        queue: Queue,
        quota: Quota,
        stop: asyncio.Event,
        forming: asyncio.Lock,
        metrics: Metrics,
        live_ready: asyncio.Event,
    ) -> None:
        self.config = config
        self.pool = pool
        self.source = source
        self.queue = queue
        self.quota = quota
        self.stop = stop
        self.forming = forming
        self.metrics = metrics
        self.live_ready = live_ready
        self.unsubscribe = config.source.on_delete == "unsubscribe"
        self.lead = min(FORM_LEAD, config.limits.span / 10)
        self.budget = min(FORM_BUDGET, max(self.lead, config.limits.span))
        self.log = logger

    async def form_then_acquire(
        self, state: State, kind: str, attempt_no: int
    ) -> tuple[Slot | None, list[Member]]:
        """A fresh batch is formed just before its slot frees, so the slot is used on time (G2);
        and one formed batch at most per process waits for a slot, so users of the live lane
        never queue behind several formed backfill batches (G11)."""
        async with self.forming:
            # paced: a backfill batch goes one slot after the last start; a live user staged
            # meanwhile still makes it into this batch, formed at the end of the wait
            state_now = await self.quota.state()
            wait = max(state_now.next_paced_in, state_now.paused_for or 0.0) - self.lead
            backlog = wait > 0 and await self.queue.has_paced_ready()
            if backlog:
                # a backlog drains at the pace, and live users go at the head of its next batch
                # (a slot at most): a live batch ahead of the pace would only borrow a slot the
                # window then lacks, and every change after it would wait for the window to turn
                await sleep(self.stop, wait)
            elif wait > 0 and await self._live_came(wait):  # raises Stopping on shutdown
                # live users need not wait for the pace: a free slot, if any, is theirs now
                free_in = (await self.quota.state()).next_free_in - self.lead
                if free_in > 0:
                    await sleep(self.stop, free_in)
            members = await self.form(state)
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
                # live users may use any free slot at once, but not ahead of a backlog's pace
                paced=state.batch.lane != LIVE or backlog,
            )
        if slot is None:
            raise Stopping()
        return slot, members

    async def form(self, state: State) -> list[Member]:
        """A new batch of up to `batch_size` ready users (live lane first), topped up when
        validation or deduplication leaves some out: until it is full or no ready user is left,
        for at most `budget` seconds (G2 after a bulk touch where few rows really changed)."""
        if not await self.queue.has_ready():  # another worker took them: no empty batch row
            return []
        state.batch = batch = await self.queue.new_batch()
        size = self.config.limits.batch_size
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget
        members: list[Member] = []
        lanes: dict[str, int] = {}
        taken_so_far = 0
        while len(members) < size:
            ask = form_round(size - len(members), taken_so_far, len(members))
            taken = await self.queue.take_ready(batch, ask, by_action=self.unsubscribe, decide=not members)
            if not taken:
                break
            taken_so_far += len(taken)
            lanes.update((user_id, lane) for user_id, (lane, _) in taken.items())
            members += await self.prepare(
                batch, list(taken), {user_id: k for user_id, (_, k) in taken.items()}
            )
            if len(taken) < ask or loop.time() >= deadline:
                break
        if len(members) > size:  # a round took more than was needed: the rest wait again
            await self.queue.put_back(batch, [m.user_id for m in members[size:]])
            members = members[:size]
        lane = min((lanes[m.user_id] for m in members), default=LIVE)
        batch.lane = lane
        await self.queue.set_members(batch, [m.user_id for m in members], lane)
        if members:
            renames = sum(1 for m in members if records.NEW_EMAIL in m.payload)
            log = self.log.bind(
                batch_id=batch.id, users=len(members), lane=lane_name(lane), action=batch.action
            )
            (log.bind(renames=renames) if renames else log).info("batch created")
        return members

    async def refresh(self, batch: Batch, members: list[Member]) -> list[Member]:
        """After waiting for the slot: users whose row changed meanwhile are read again."""
        async with self.pool.acquire() as conn:
            versions = await self.source.versions(conn, [m.user_id for m in members])
        changed = {m.user_id for m in members if versions.get(m.user_id) != m.read_at}
        if not changed:
            return members
        fresh = await self.prepare(batch, [m.user_id for m in members if m.user_id in changed])
        kept = [m for m in members if m.user_id not in changed] + fresh
        await self.queue.set_members(batch, [m.user_id for m in kept])
        return kept

    async def prepare(
        self,
        batch: Batch,
        user_ids: Sequence[str],
        known: dict[str, Known] | None = None,
    ) -> list[Member]:
        """Read the users now; invalid and unreadable ones to failures, unchanged and missing
        ones out (settled: their failures may resolve). `known`: their `user_state`, when the
        caller has it already (read by `take_ready`)."""
        if known is None:
            known = await self.queue.user_state(user_ids)  # before the rows: see Member.seq
        if batch.action == UNSUBSCRIBE:
            return await self._prepare_gone(batch, user_ids, known)
        async with self.pool.acquire() as conn:
            rows, unreadable = await reading.fetch(conn, self.source, user_ids)
        members: list[Member] = []
        dropped: dict[str, int] = {}
        settled: dict[str, str] = {}
        moved: dict[str, bool] = {}
        rename = self.config.api.rename == "new_email"
        for bad in unreadable:  # a value the driver cannot decode: only its user fails (G14)
            await self._unusable(batch, bad.user_id, bad.field, bad.reason)
            dropped[bad.user_id] = known.get(bad.user_id, NEVER_KNOWN).seq
        for n, user_id in enumerate(user_ids):
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # validation is CPU work: let a request in flight go out
            if user_id in dropped:
                continue
            state = known.get(user_id, NEVER_KNOWN)
            seq, prior = state.seq, state.prior
            row = rows.get(user_id)
            if row is None:  # deleted, or no longer passes the filter
                if self._held(state):  # the API holds it: an unsubscribe batch's (G12)
                    moved[user_id] = True
                else:
                    dropped[user_id] = seq
                    settled[user_id] = "gone"
                continue
            try:
                result = records.validate(user_id, row.values, self.config.source.fields)
                digest = None if isinstance(result, records.Invalid) else records.content_hash(result)
            except Exception as exc:  # a row the payload builder cannot take: only its user (G14)
                reason = f"cannot build the payload: {reading.describe(exc)}"
                await self._unusable(batch, user_id, None, reason)
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
            # the API has exactly this already (G4); not so sure after an unanswered unsubscribe
            if not state.unsubscribing and prior.unchanged(result, state.sent_hash, digest):
                dropped[user_id] = seq
                settled[user_id] = "unchanged"
                continue
            if state.maybe_unsubscribed:  # back after its unsubscribe, or one unanswered (G12)
                result = {**result, **ACTIVE}  # the hash stays the data's: sent_hash was forgotten
            sub = records.subscriber(result, prior, rename=rename)
            members.append(
                Member(user_id, sub.body, digest, row.updated_at, seq, sub.email, sub.pending, sub.again)
            )
        await self._leave(batch, dropped, settled, moved)
        return members

    async def _prepare_gone(
        self, batch: Batch, user_ids: Sequence[str], known: dict[str, Known]
    ) -> list[Member]:
        """An unsubscribe batch's users: those whose row is still gone and whom the API holds go
        as `{"email": sent_email}` (and the email of a rename sent but never answered: the API
        holds it under one of the two); a row back (or never gone) leaves for a subscribe batch."""
        async with self.pool.acquire() as conn:
            present = await self.source.versions(conn, user_ids)
        members: list[Member] = []
        dropped: dict[str, int] = {}
        settled: dict[str, str] = {}
        moved: dict[str, bool] = {}
        for user_id in user_ids:
            state = known.get(user_id, NEVER_KNOWN)
            if user_id in present:
                moved[user_id] = False
            elif self._held(state):
                email = state.prior.email
                assert email is not None  # (_held)
                also = state.prior.pending if state.prior.pending != email else None
                members.append(
                    Member(user_id, {records.EMAIL: email}, b"", None, state.seq, email, None, False, also)
                )
            else:  # never accepted, or unsubscribed already: the API needs nothing
                dropped[user_id] = state.seq
                settled[user_id] = "gone"
        await self._leave(batch, dropped, settled, moved)
        return members

    def _held(self, state: Known) -> bool:
        """Is the user subscribed at the API, to be unsubscribed now that its row is gone?"""
        return self.unsubscribe and state.prior.email is not None and state.unsubscribed_at is None

    async def _leave(
        self, batch: Batch, dropped: dict[str, int], settled: dict[str, str], moved: dict[str, bool]
    ) -> None:
        """Users out of the batch: dropped (settled or dead-lettered) or moved to the other action."""
        await self.queue.drop_users(batch, dropped, settled=settled)
        await self.queue.move_users(batch, moved)
        if dropped or moved:  # they are no longer the batch's
            batch.user_ids = [u for u in batch.user_ids if u not in dropped and u not in moved]
        if moved:
            self.log.bind(
                batch_id=batch.id,
                to_unsubscribe=sum(moved.values()),
                to_subscribe=sum(not g for g in moved.values()),
            ).info("users whose row left or came back wait for a batch of the other kind")
        if settled:
            await self.resolve(list(settled))

    async def resolve(self, user_ids: Sequence[str]) -> None:
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

    async def _unusable(self, batch: Batch, user_id: str, field: str | None, reason: str) -> None:
        """A user whose row cannot be read or built into a payload: dead-lettered alone."""
        await self.queue.record_failure("error", [user_id], reason, field=field, batch_id=batch.id)
        self.metrics.dead_lettered.labels(kind="error").inc()
        self.log.bind(batch_id=batch.id, user_id=user_id, field=field).error(
            "user dead-lettered: {}", reason[:200]
        )

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


def form_round(want: int, taken: int, kept: int) -> int:
    """Users to take in the next round of forming a batch that still wants `want`, after
    `taken` were taken and `kept` of them kept. When deduplication drops most users (a bulk
    `updated_at` touch), rounds grow by the kept share, so a batch fills in a few rounds."""
    if taken == 0 or kept >= taken:
        return want
    if kept == 0:
        return max(want, min(FORM_ROUND_MAX, want * 10))
    return max(want, min(FORM_ROUND_MAX, math.ceil(want * taken / kept)))


async def sleep(stop: asyncio.Event, seconds: float) -> None:
    """Wait on the event loop; a shutdown interrupts it (Stopping)."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return
    raise Stopping()
