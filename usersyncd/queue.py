"""The durable queue: ready users in `sync_state`, batches leased by the worker that sends them.

A user is in at most one open batch (`sync_state.batch_id`), so no user is ever in two
requests at once (G6). Every method is one transaction; SQL lives in `sql/queue.sql`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import asyncpg

from usersyncd import db, records

# sync_state.lane, taken in this order: live changes; paced ones (the backfill and waves, one
# slot apart); redrives (G13). 2 is not used (waves share the paced lane).
LANES = {0: "live", 1: "paced", 3: "redrive"}
SUBSCRIBE, UNSUBSCRIBE = "subscribe", "unsubscribe"  # batches.action: which endpoint (G12)


def lane_name(lane: int) -> str:
    return LANES.get(lane, f"lane {lane}")


@dataclass
class Batch:
    id: int
    user_ids: list[str]
    attempts: int = 0  # attempts already spent (persisted: survives a restart)
    lane: int = 0  # 0 live (or replay), 1 backfill: only backfill is paced
    reclaimed: bool = False  # taken from the queue again (released, or its worker vanished)
    last_status: int | None = None  # of the last attempt that failed (persisted)
    last_error: str | None = None
    last_kind: str | None = None  # 'exhausted' (the API's answers) or 'error' (preparing it)
    action: str = SUBSCRIBE  # or UNSUBSCRIBE: users whose row is gone (G12)


class Sent(NamedTuple):
    """A user the API accepted: what `sync_state` keeps of it."""

    user_id: str
    hash: bytes  # of the payload sent (G4)
    read_at: str  # the row's version when read (`Source.version_sql`: a timestamptz as text)
    seq: int  # its stage_seq when read: staged again since means send again
    email: str | None  # the email the API keys it by now (G12)
    tags: str | None  # the tags sent, as JSON (removed ones go as remove_tags later)
    again: bool = False  # sent with another email than its row's (a rename finished first): again


class Known(NamedTuple):
    """A user's state before its row is read: what the API last accepted, when it was staged."""

    sent_hash: bytes | None
    seq: int  # stage_seq
    prior: records.Prior  # the email, pending rename and tags last accepted (G12)
    unsubscribed_at: datetime | None = None  # the API accepted its unsubscribe (G12)
    unsubscribing: bool = False  # an unsubscribe of it started, unanswered: it may have landed

    @property
    def maybe_unsubscribed(self) -> bool:
        """The API holds it unsubscribed, or may: a row back is sent with "status": "active"."""
        return self.unsubscribed_at is not None or self.unsubscribing


def _known(row: asyncpg.Record) -> Known:
    """A user's `Known` from a row of `user_state` (or `take_ready`: the same columns)."""
    tags = row["sent_tags"]
    return Known(
        row["sent_hash"],
        row["stage_seq"],
        records.Prior(
            row["sent_email"], row["pending_email"], json.loads(tags) if tags is not None else None
        ),
        row["unsubscribed_at"],
        row["unsubscribing"],
    )


@dataclass(frozen=True)
class Backlog:
    live_ready: int
    backfill_ready: int
    open_batches: int
    open_failures: int


class Queue:
    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        name: str,
        *,
        worker: str,
        lease: float,
        request_timeout: float = 0.0,
    ) -> None:
        self.pool = pool
        self.name = name
        self.worker = worker
        self.lease = lease  # seconds
        # api.timeout: an abandoned batch's unanswered request may be in flight this long (G6)
        self.request_timeout = request_timeout
        self.sql = db.queries("queue", schema)

    async def has_work(self) -> bool:
        return bool(await self.pool.fetchval(self.sql["has_work"], self.name, self.request_timeout))

    async def has_ready(self) -> bool:
        return bool(await self.pool.fetchval(self.sql["has_ready"]))

    async def has_live_ready(self) -> bool:
        return bool(await self.pool.fetchval(self.sql["has_live_ready"]))

    async def has_paced_ready(self) -> bool:
        return bool(await self.pool.fetchval(self.sql["has_paced_ready"]))

    async def claim_open_batch(self) -> Batch | None:
        """A released or abandoned batch, if one is due."""
        row = await self.pool.fetchrow(
            self.sql["claim_open_batch"], self.name, self.worker, self.lease, self.request_timeout
        )
        if row is None:
            return None
        return Batch(
            row["id"],
            list(row["user_ids"]),
            row["attempts"],
            lane=row["lane"],
            reclaimed=True,
            last_status=row["last_status"],
            last_error=row["last_error"],
            last_kind=row["last_kind"],
            action=row["action"],
        )

    async def new_batch(self) -> Batch:
        batch_id = await self.pool.fetchval(self.sql["new_batch"], self.name, self.worker, self.lease)
        return Batch(batch_id, [])

    async def take_ready(
        self, batch: Batch, limit: int, *, by_action: bool = False, decide: bool = False
    ) -> dict[str, tuple[int, Known]]:
        """Move up to `limit` ready users into the batch (live lane first): {user id: (lane,
        state)}, the state as `user_state` gives it (read in the same statement: no round trip
        more per batch). `by_action` (on_delete = "unsubscribe"): only users of the batch's
        action, which the first ready user decides when `decide` (a gone user: an unsubscribe batch)."""
        gone = None if decide else batch.action == UNSUBSCRIBE
        async with self.pool.acquire() as conn, conn.transaction():
            # one worker forms at a time, so two never split the tail of a backlog (G2)
            await conn.execute(self.sql["form_lock"], self.name)
            rows = await conn.fetch(self.sql["take_ready"], batch.id, limit, gone, by_action)
        if by_action and rows and decide:
            batch.action = UNSUBSCRIBE if rows[0]["gone"] else SUBSCRIBE
        return {r["user_id"]: (r["lane"], _known(r)) for r in rows}

    async def user_state(self, user_ids: Sequence[str]) -> dict[str, Known]:
        """What the API last accepted of these users and their stage_seq: read before their rows."""
        rows = await self.pool.fetch(self.sql["user_state"], db.text_array(user_ids))
        return {r["user_id"]: _known(r) for r in rows}

    async def mark_pending(self, batch: Batch, pending: dict[str, str]) -> None:
        """Before a request carrying renames starts: the email each renamed user's subscriber is
        keyed by should the request land unanswered (G12; `records.subscriber` reads it back)."""
        if not pending:
            return
        ids = sorted(pending)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(self.sql["lock_users"], db.text_array(ids))
            await conn.execute(self.sql["mark_pending"], batch.id, ids, [pending[u] for u in ids])

    async def mark_unsubscribing(self, batch: Batch, user_ids: Sequence[str]) -> None:
        """Before an unsubscribe request starts: should it land unanswered, a row that comes
        back is re-subscribed with "status": "active" (G12; `Known.maybe_unsubscribed`)."""
        if not user_ids:
            return
        ids = sorted(user_ids)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(self.sql["lock_users"], db.text_array(ids))
            await conn.execute(self.sql["mark_unsubscribing"], batch.id, ids)

    async def clear_pending(self, pending: dict[str, str]) -> None:
        """The API refused these renames (an answer: nothing of the request was applied)."""
        if not pending:
            return
        ids = sorted(pending)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(self.sql["lock_users"], db.text_array(ids))
            await conn.execute(self.sql["clear_pending"], ids, [pending[u] for u in ids])

    async def set_members(self, batch: Batch, user_ids: Sequence[str], lane: int | None = None) -> None:
        batch.user_ids = list(user_ids)
        await self.pool.execute(
            self.sql["set_members"], batch.id, db.text_array(batch.user_ids), lane, batch.action
        )

    async def drop_users(
        self, batch: Batch, seqs: dict[str, int], *, settled: dict[str, str] | None = None
    ) -> None:
        """Users leave the batch unsent; they wait again only if staged again since read.
        `settled`: {user id: 'unchanged' | 'gone'} for those the API needs nothing for; their
        open failures resolve (`resolve_failures`, after this commits) once every user of a
        failure is settled (G7)."""
        if not seqs:
            return
        settled = settled or {}
        ids = sorted(seqs)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(self.sql["lock_users"], db.text_array(ids))
            await conn.execute(
                self.sql["drop_users"], batch.id, ids, [seqs[u] for u in ids], [settled.get(u) for u in ids]
            )

    async def move_users(self, batch: Batch, gone: dict[str, bool]) -> None:
        """Users leave the batch, still dirty, for a batch of the other action: `gone` True
        (their row is deleted or filtered out: to be unsubscribed) or False (back: subscribed)."""
        for flag in (True, False):
            ids = sorted(u for u, g in gone.items() if g is flag)
            if not ids:
                continue
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(self.sql["lock_users"], db.text_array(ids))
                await conn.execute(self.sql["move_users"], batch.id, ids, flag)

    async def mark_unsubscribed(self, batch: Batch, seqs: dict[str, int]) -> None:
        """The API accepted these users' unsubscribe ({user id: stage_seq when read}).
        Idempotent, like `mark_sent`."""
        if not seqs:
            return
        ids = sorted(seqs)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(self.sql["lock_users"], db.text_array(ids))
            await conn.execute(
                self.sql["mark_unsubscribed"], batch.id, ids, [seqs[u] for u in ids], self.worker
            )

    async def members_of(self, batch: Batch) -> list[str]:
        """The users sync_state puts in the batch (also those taken but not yet recorded)."""
        return [r["user_id"] for r in await self.pool.fetch(self.sql["members_of"], batch.id)]

    async def put_back(self, batch: Batch, user_ids: Sequence[str]) -> None:
        """Users taken beyond a full batch wait again, still dirty."""
        if not user_ids:
            return
        ids = sorted(user_ids)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(self.sql["lock_users"], db.text_array(ids))
            await conn.execute(self.sql["put_back"], batch.id, ids)

    async def mark_sent(self, batch: Batch, sent: Sequence[Sent]) -> None:
        """The API accepted these users: remember what was sent. Idempotent (only users still
        in the batch change), so it can be retried. Their failures are resolved apart
        (`resolve_failures`), after this commits."""
        if not sent:
            return
        ordered = sorted(sent)
        ids = db.text_array([s.user_id for s in ordered])
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(self.sql["lock_users"], ids)
            await conn.execute(
                self.sql["mark_sent"],
                batch.id,
                ids,
                [s.hash for s in ordered],
                db.text_array([s.read_at for s in ordered]),
                [s.seq for s in ordered],
                db.text_array([s.email for s in ordered]),
                [s.tags for s in ordered],
                [s.again for s in ordered],
                self.worker,
            )

    async def resolve_failures(self, user_ids: Sequence[str]) -> int:
        """Resolve the open failures of these users whose every user is settled since; how many."""
        if not user_ids:
            return 0
        status = await self.pool.execute(self.sql["resolve_failures"], db.text_array(user_ids))
        return int(status.split()[-1])

    async def spend_attempt(
        self,
        batch: Batch,
        *,
        next_in: float,
        status: int | None,
        error: str | None,
        kind: str = "exhausted",
    ) -> int:
        batch.attempts = await self.pool.fetchval(
            self.sql["spend_attempt"], batch.id, next_in, status, error, kind
        )
        batch.last_status, batch.last_error, batch.last_kind = status, error, kind
        return batch.attempts

    async def finish(
        self, batch: Batch, status: str, *, http_status: int | None = None, error: str | None = None
    ) -> None:
        await self.pool.execute(self.sql["finish_batch"], batch.id, status, http_status, error, self.worker)

    async def release_mine(self, *, due_in: float = 0.0) -> str:
        """Shutdown: every batch this worker holds goes back to the queue."""
        return await self.pool.execute(self.sql["release_batches"], self.worker, due_in)

    async def hold(self, batch: Batch) -> bool:
        """Renew the batch's lease if it is still this worker's; False if another took it over."""
        return await self.pool.fetchval(self.sql["hold_batch"], batch.id, self.worker, self.lease) is not None

    async def renew_leases(self) -> None:
        await self.pool.execute(self.sql["renew_leases"], self.worker, self.lease)

    async def record_failure(
        self,
        kind: str,
        user_ids: Sequence[str],
        error: str,
        *,
        field: str | None = None,
        http_status: int | None = None,
        attempts: int = 1,
        request_id: str | None = None,
        batch_id: int | None = None,
        payload: Any = None,
    ) -> int:
        """Dead-letter users (an open failure of the same kind for the same user is updated)."""
        return await self.pool.fetchval(
            self.sql["record_failure"],
            kind,
            list(user_ids),
            field,
            error,
            http_status,
            attempts,
            request_id,
            batch_id,
            json.dumps(payload, default=str) if payload is not None else None,
        )

    async def backlog(self) -> Backlog:
        row = await self.pool.fetchrow(self.sql["backlog"])
        return Backlog(**dict(row))

    async def prune(self, retention_days: float) -> None:
        """Finished batches and resolved failures older than the retention go; open failures
        whose users are all settled are resolved (in case their own resolution did not run)."""
        await self.pool.execute(self.sql["prune"], retention_days * 86400)
        await self.pool.execute(self.sql["prune_failures"], retention_days * 86400)
        await self.pool.execute(self.sql["resolve_settled"])
