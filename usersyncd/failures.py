"""Operator commands on the dead letters (G7): list, forget, replay; and the request history.

A replay re-queues the failed users in the live lane with their CURRENT rows (the workers read
them at send time) through the same quota. Claiming a failure for replay is one UPDATE that only
takes failures not yet replayed, so two replays at once re-queue each user once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from usersyncd import db


@dataclass(frozen=True)
class ReplayResult:
    failures: list[int]  # ids re-queued by this call
    users: int  # distinct users re-queued
    skipped: list[int]  # ids asked for but not open, or already being replayed


async def list_open(pool: asyncpg.Pool, schema: str) -> list[dict[str, Any]]:
    sql = db.queries("failures", schema)
    return [dict(r) for r in await pool.fetch(sql["list_open"])]


async def forget(pool: asyncpg.Pool, schema: str, ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """Delete these failures; returns (deleted ids, ids that did not exist)."""
    sql = db.queries("failures", schema)
    deleted = [r["id"] for r in await pool.fetch(sql["forget"], list(ids))]
    return deleted, sorted(set(ids) - set(deleted))


async def replay(
    pool: asyncpg.Pool,
    schema: str,
    *,
    ids: Sequence[int] = (),
    since: datetime | None = None,
    all_open: bool = False,
    dry_run: bool = False,
) -> ReplayResult:
    """Re-queue the users of the chosen open failures (none chosen: nothing happens)."""
    sql = db.queries("failures", schema)
    async with pool.acquire() as conn, conn.transaction():
        if dry_run:
            rows = await conn.fetch(sql["replay_candidates"], list(ids) or None, since, all_open)
        else:
            rows = await conn.fetch(sql["claim_for_replay"], list(ids) or None, since, all_open)
            users = sorted({u for r in rows for u in r["user_ids"]})
            if users:
                await conn.execute(sql["requeue_users"], users)
    claimed = [r["id"] for r in rows]
    users = {u for r in rows for u in r["user_ids"]}
    skipped = sorted(set(ids) - set(claimed))
    return ReplayResult(failures=sorted(claimed), users=len(users), skipped=skipped)


async def history(
    pool: asyncpg.Pool, schema: str, *, since: datetime | None, limit: int
) -> list[dict[str, Any]]:
    sql = db.queries("failures", schema)
    return [dict(r) for r in await pool.fetch(sql["history"], since, limit)]


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, default=str, indent=2)


def render_failures(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no open failures"
    lines = [f"{'id':>6}  {'kind':9} {'users':>5}  {'status':>6}  {'att':>3}  {'last failed':19}  error"]
    for r in rows:
        users = r["user_ids"]
        who = users[0] if len(users) == 1 else f"{len(users)}"
        error = (f"{r['field']}: " if r["field"] else "") + r["error"].replace("\n", " ")
        replayed = (
            f"  [replayed {r['replayed_at']:%Y-%m-%d %H:%M}: {r['replay_outcome'] or 'pending'}]"
            if r["replayed_at"]
            else ""
        )
        if "redrives" in r:
            nxt = r.get("next_redrive_at")
            replayed += f"  [redriven {r['redrives']}x; " + (
                f"next {nxt:%Y-%m-%d %H:%M:%S}]" if nxt else "no more: replay-failed when fixed]"
            )
        lines.append(
            f"{r['id']:>6}  {r['kind']:9} {who:>5}  {r['http_status'] or '':>6}  {r['attempts']:>3}"
            f"  {r['last_failed_at']:%Y-%m-%d %H:%M:%S}  {error[:100]}{replayed}"
        )
    return "\n".join(lines)


def render_history(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no requests in that period"
    lines = [
        f"{'started':23}  {'kind':8} {'batch':>6} {'users':>5} {'status':>6}  {'outcome':12} {'ms':>8}  request id / API's id"
    ]
    for r in rows:
        duration = f"{r['duration_ms']:.0f}" if r["duration_ms"] is not None else ""
        lines.append(
            f"{r['started_at']:%Y-%m-%d %H:%M:%S.%f}"[:-3]
            + f"  {r['kind']:8} {r['batch_id'] or '':>6} {r['users'] or '':>5} {r['status'] or '':>6}"
            f"  {r['outcome'] or 'in flight':12} {duration:>8}  {r['request_id'] or ''} / {r['response_request_id'] or ''}"
            + (f"  {r['error'][:80]}" if r["error"] else "")
            + ("  [unsubscribe]" if r.get("action") == "unsubscribe" else "")
        )
    return "\n".join(lines)
