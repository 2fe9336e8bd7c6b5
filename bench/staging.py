"""Poller benchmark (SPEC §9): rows read and staged per second, and peak memory, on a large table.

    python bench/staging.py [--rows 1000000] [--runs 3]

Seeds the table once, then per run: a fresh state schema, the backfill lane with no lookahead
limit, polled until caught up (every row read once and staged into sync_state). Peak memory is
the process's maximum resident set size: staging is SQL on the server, so it stays flat.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time

import asyncpg
from common import database, median, seed_users

from usersyncd import db, poller, source
from usersyncd.config import Config


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    async with database() as url:
        conn = await asyncpg.connect(url)
        began = time.perf_counter()
        await seed_users(conn, args.rows)
        await conn.execute("ANALYZE users")
        print(f"seeded {args.rows:,} rows in {time.perf_counter() - began:.1f} s", flush=True)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
        rates = []
        for run in range(args.runs):
            schema = f"bench_{run}"
            async with pool.acquire() as c:
                await db.migrate(c, schema)
            config = Config.model_validate(
                {
                    "database": {"url": url, "state_schema": schema},
                    "api": {"url": "http://127.0.0.1:9"},
                }
            )
            service = poller.UserSyncService(
                config, pool, await source.inspect(conn, config.source), work_ready=asyncio.Event()
            )
            service.lookahead = 10 * args.rows  # stage everything: measure the scan, not the limit
            await service.init_cursors()
            began = time.perf_counter()
            staged = 0
            while True:
                result = await service.poll_once()
                staged += result.staged
                if result.caught_up:
                    break
            elapsed = time.perf_counter() - began
            rates.append(staged / elapsed)
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"run {run + 1}: staged {staged:,} rows in {elapsed:.1f} s = {staged / elapsed:,.0f} rows/s;"
                f" peak RSS {peak_mb:.0f} MB",
                flush=True,
            )
            await conn.execute(f"DROP SCHEMA {db.quote_ident(schema)} CASCADE")
        await pool.close()
        await conn.close()
    print(
        f"median: {median(rates):,.0f} rows/s staged; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    asyncio.run(main())
