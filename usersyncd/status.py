"""`usersyncd status`: backlog, queue, quota, failures, pause, live processes — from the database.

The same snapshot feeds the metrics endpoint's gauges, so both always agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from usersyncd import db, source
from usersyncd.config import Config
from usersyncd.quota import Quota

LIVE_AFTER = 30.0  # seconds: a process whose heartbeat is older is taken for dead
ESTIMATE_ABOVE = 100_000  # rows: past this, a count for the metrics is the planner's estimate
COUNTS = ("live_ready", "backfill_ready", "in_batches", "open_batches", "open_failures", "gone")


@dataclass
class Status:
    live_ready: int  # users waiting in the live lane
    backfill_ready: int  # users of the paced lane (backfill and waves) staged, waiting
    wave_ready: int  # of which staged for changes since the first start (a wave), not the backfill
    backfill_unstaged: int | None  # source rows the backfill has not reached yet (None: done)
    in_batches: int  # users in open batches (being sent or waiting for a retry)
    open_batches: int
    open_failures: int
    quota_used: int
    quota_limit: int
    window: float
    next_slot_in: float  # seconds
    paused: str | None
    paused_for: float | None
    pause_detail: str | None
    last_success: datetime | None
    live_processes: list[dict[str, Any]]
    cursors: dict[str, dict[str, Any]]
    drain_eta: float  # seconds to send the whole backlog at full quota
    gone: int = 0  # users the API holds subscribed whose row is deleted or filtered out (G12)
    on_delete: str = "ignore"  # what is done for them
    reconcile: dict[str, Any] | None = None  # the last reconciliation pass and the one under way
    estimated: list[str] = field(default_factory=list)  # counts that are planner estimates

    @property
    def backlog(self) -> int:
        return self.live_ready + self.backfill_ready + (self.backfill_unstaged or 0) + self.in_batches


def drain_eta(
    users: int, *, batch_size: int, limit: int, span: float, used: int, next_slot_in: float
) -> float:
    """Seconds until the last of `users` can be sent at full quota, given the window's state."""
    requests = math.ceil(users / batch_size)
    if requests == 0:
        return 0.0
    free_now = max(limit - used, 0)
    if requests <= free_now:
        return 0.0
    later = requests - free_now
    # after the free slots, each further group of `limit` needs one more span
    return next_slot_in + (math.ceil(later / limit) - 1) * span


async def collect(
    pool: asyncpg.Pool, config: Config, *, count_unstaged: bool = True, exact: bool = True
) -> Status:
    """The snapshot. Not `exact` (the metrics, the schedule line): a count past ESTIMATE_ABOVE
    rows is the planner's estimate, so that a read costs the same at millions of rows."""
    schema = config.database.state_schema
    q = db.quote_ident(schema)
    sql = db.queries("status", schema)
    quota = Quota(
        pool,
        config.limits,
        schema,
        worker="status",
        credentials_probe_every=config.retry.backoff,
        request_timeout=config.api.timeout,
    )
    state = await quota.state()
    async with pool.acquire() as conn:
        counts = dict(await conn.fetchrow(sql["counts"], None if exact else ESTIMATE_ABOVE))
        estimated = []
        for name in COUNTS:
            if not exact and counts[name] >= ESTIMATE_ABOVE:
                plan = json.loads(await conn.fetchval(sql[f"{name}_estimate"]))
                counts[name] = max(ESTIMATE_ABOVE, round(plan[0]["Plan"]["Plan Rows"]))
                estimated.append(name)
        processes = [
            dict(r)
            for r in await conn.fetch(
                f"SELECT id, host, pid, version, started_at, heartbeat_at FROM {q}.processes"
                " WHERE heartbeat_at > clock_timestamp() - make_interval(secs => $1) ORDER BY started_at",
                LIVE_AFTER,
            )
        ]
        poller_sql = db.queries("poller", schema)
        cursors = {r["lane"]: dict(r) for r in await conn.fetch(poller_sql["cursors"])}
        wave_ready = await conn.fetchval(poller_sql["wave_waiting"], None if exact else ESTIMATE_ABOVE)
        unstaged = await _unstaged(conn, config, cursors.get("backfill")) if count_unstaged else None
        passes = await conn.fetchrow(db.queries("reconcile", schema)["state"])
    users = counts["live_ready"] + counts["backfill_ready"] + (unstaged or 0) + counts["in_batches"]
    return Status(
        live_ready=counts["live_ready"],
        backfill_ready=counts["backfill_ready"],
        wave_ready=wave_ready,
        backfill_unstaged=unstaged,
        in_batches=counts["in_batches"],
        open_batches=counts["open_batches"],
        open_failures=counts["open_failures"],
        quota_used=state.used,
        quota_limit=state.limit,
        window=state.window,
        next_slot_in=state.next_free_in,
        paused=state.paused,
        paused_for=state.paused_for,
        pause_detail=state.pause_detail,
        last_success=counts["last_success"],
        live_processes=processes,
        cursors=cursors,
        drain_eta=drain_eta(
            users,
            batch_size=config.limits.batch_size,
            limit=state.limit,
            span=config.limits.span,
            used=state.used,
            next_slot_in=state.next_free_in,
        ),
        gone=counts["gone"],
        on_delete=config.source.on_delete,
        reconcile=dict(passes) if passes is not None else None,
        estimated=estimated,
    )


async def _unstaged(conn: asyncpg.Connection, config: Config, cursor: dict[str, Any] | None) -> int | None:
    """Source rows between the backfill cursor and its end (an index range count)."""
    if cursor is None or cursor["done"]:
        return None
    src = await source.inspect(conn, config.source)
    upd, uid = (
        db.quote_ident(config.source.updated_at_column),
        db.quote_ident(config.source.id_column),
    )
    after = (
        f"({upd}, {uid}) > ($1::timestamptz, $2::text::{src.id_type})"
        if cursor["last_id"] is not None
        else f"{upd} >= $1::timestamptz AND $2::text IS NULL"
    )
    return await conn.fetchval(
        f"SELECT count(*) FROM {src.table} WHERE {after} AND {upd} < $3 AND {src.where_filter}",
        cursor["updated_at"],
        cursor["last_id"],
        cursor["until_at"],
    )


async def live_process_count(pool: asyncpg.Pool, schema: str) -> int:
    return await pool.fetchval(
        f"SELECT count(*) FROM {db.quote_ident(schema)}.processes"
        " WHERE heartbeat_at > clock_timestamp() - make_interval(secs => $1)",
        LIVE_AFTER,
    )


def render_json(status: Status) -> str:
    data = asdict(status)
    data["backlog"] = status.backlog
    return json.dumps(data, default=str, indent=2)


def _gone(status: Status) -> str:
    """Users whose row is deleted or filtered out while the API holds them, and the last pass."""
    what = {
        "ignore": "left subscribed at the API (on_delete = ignore)",
        "unsubscribe": "to unsubscribe (on_delete = unsubscribe)",
    }[status.on_delete]
    line = f"{status.gone} {what}"
    passes = status.reconcile or {}
    if passes.get("last_pass_seconds") is not None:  # a pass has run
        line += (
            f"; last reconcile pass {passes['last_pass_at'].isoformat(timespec='seconds')}:"
            f" {passes['last_pass_checked']} users checked in {passes['last_pass_seconds']:.1f} s,"
            f" {passes['last_pass_found']} found"
        )
    if passes.get("pass_started_at") is not None:
        line += f"; a pass under way ({passes['pass_checked']} checked)"
    return line


def render_text(status: Status) -> str:
    def ago(moment: datetime | None) -> str:
        return moment.isoformat(timespec="seconds") if moment else "never"

    pause = "no"
    if status.paused:
        pause = f"{status.paused} ({status.pause_detail or ''}; {status.paused_for or 0:.1f} s left)"
    backfill = (
        "done" if status.backfill_unstaged is None else f"{status.backfill_unstaged} rows not yet staged"
    )
    lines = [
        f"backlog:        {status.backlog} users (live lane {status.live_ready}; paced lane {status.backfill_ready}:"
        f" wave {status.wave_ready}, backfill and redrives {status.backfill_ready - status.wave_ready}; {backfill})",
        f"queued batches: {status.open_batches} ({status.in_batches} users in them)",
        f"quota:          {status.quota_used}/{status.quota_limit} requests in the current {status.window:g} s window;"
        f" next slot frees in {status.next_slot_in:.1f} s",
        f"drain ETA:      {status.drain_eta:.0f} s at full quota",
        f"open failures:  {status.open_failures}",
        f"gone:           {_gone(status)}",
        f"last success:   {ago(status.last_success)}",
        f"paused:         {pause}",
        f"live workers:   {len(status.live_processes)} process(es)"
        + "".join(
            f"\n  - {p['id']} (pid {p['pid']}, since {ago(p['started_at'])})" for p in status.live_processes
        ),
    ]
    for lane, cursor in status.cursors.items():
        lines.append(
            f"cursor {lane + ':':9} {ago(cursor['updated_at'])}" + (" (done)" if cursor.get("done") else "")
        )
    return "\n".join(lines)
