"""Reconciliation pass benchmark (SPEC G12): seconds per pass over the users usersyncd holds.

    python bench/reconcile.py [--users 5000000] [--runs 3] [--json bench/results/reconcile.json]

Seeds a users table and a sync_state row per user (each sent before: the API holds its email),
then deletes one row in 1,000 and moves one in 1,000 out of the filter (`active`), with no other
change: what only the pass can find. Each run is one whole pass (chunks of reconcile.CHUNK, one
short transaction each); the users it marked are reset between runs. Reports the seconds per
pass, users checked per second, and the longest chunk (the longest transaction the pass holds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import asyncpg
from common import REPO, database, median, seed_users

from usersyncd import db, reconcile, source
from usersyncd.config import Config

SCHEMA = "usersync"


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=5_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "reconcile.json")
    args = parser.parse_args()
    async with database() as url:
        conn = await asyncpg.connect(url)
        began = time.perf_counter()
        await seed_users(conn, args.users)
        await conn.execute("ALTER TABLE users ADD COLUMN active boolean NOT NULL DEFAULT true")
        await db.migrate(conn, SCHEMA)
        await conn.execute(
            f"INSERT INTO {SCHEMA}.sync_state (user_id, seen_updated_at, dirty, sent_hash, sent_email, sent_at)"
            " SELECT id::text, updated_at, false, '\\x00', email, now() FROM users"
        )
        await conn.execute("DELETE FROM users WHERE id % 1000 = 7")
        await conn.execute("UPDATE users SET active = false WHERE id % 1000 = 501")
        await conn.execute("VACUUM ANALYZE users")
        await conn.execute(f"VACUUM ANALYZE {SCHEMA}.sync_state")
        expected = await conn.fetchval(
            f"SELECT count(*) FROM {SCHEMA}.sync_state WHERE user_id::bigint % 1000 IN (7, 501)"
        )
        print(f"seeded {args.users:,} users in {time.perf_counter() - began:.1f} s", flush=True)
        config = Config.model_validate(
            {
                "database": {"url": url, "state_schema": SCHEMA},
                "api": {"url": "http://127.0.0.1:9", "unsubscribe_path": "/unsubscribes"},
                "source": {"filter": "active", "on_delete": "unsubscribe"},
            }
        )
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        rec = reconcile.Reconciler(config, pool, await source.inspect(conn, config.source))
        runs = []
        for run in range(args.runs):
            await pool.execute(db.queries("reconcile", SCHEMA)["due_now"])
            started = time.perf_counter()
            longest, found, checked = 0.0, 0, 0
            while True:
                t = time.perf_counter()
                chunk = await rec.step()
                longest = max(longest, time.perf_counter() - t)
                assert chunk is not None
                found, checked = found + chunk.found, checked + chunk.checked
                if chunk.finished:
                    break
            seconds = time.perf_counter() - started
            assert (checked, found) == (args.users, expected), (checked, found, expected)
            runs.append({"seconds": seconds, "longest_chunk_s": longest, "checked": checked, "found": found})
            print(
                f"run {run + 1}: {checked:,} users checked in {seconds:.1f} s ({checked / seconds:,.0f} users/s),"
                f" {found:,} found; longest chunk {longest * 1000:.0f} ms",
                flush=True,
            )
            await conn.execute(f"UPDATE {SCHEMA}.sync_state SET gone = false, dirty = false WHERE gone")
        await pool.close()
        await conn.close()
    seconds = median([r["seconds"] for r in runs])
    longest = median([r["longest_chunk_s"] for r in runs])
    print()
    print("| users | chunk | seconds per pass (median) | users/s | longest chunk |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.users:,} | {reconcile.CHUNK:,} | {seconds:.1f} | {args.users / seconds:,.0f} | {longest * 1000:.0f} ms |"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"users": args.users, "chunk": reconcile.CHUNK, "median_seconds": seconds, "runs": runs}, indent=2
        )
        + "\n"
    )
    print(f"written: {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
