"""Isolation benchmark (SPEC §2): what a batch refused whole costs against the Drip-flavoured fake.

    python bench/isolate.py [--users 3000] [--culprits 3] [--runs 3]

Per run: `--culprits` emails, drawn at random, that the fake refuses with Drip's whole-batch 422
(naming no record); the real daemon (`run --once`) delivers the rest and isolates the culprits by
halves within limits.isolate_share. Prints the extra requests (beyond one per batch), the
isolation requests in the ledger, who was delivered and who was dead-lettered.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import asyncpg
from common import database, median, run_daemon, seed_users, write_config

from usersyncd.fakeapi import FakeApiProcess

ACCOUNT = "1234567"


async def one_run(url: str, users: int, culprits: int, rng: random.Random, log: Path) -> int:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP SCHEMA IF EXISTS usersync CASCADE; DROP TABLE IF EXISTS users")
        await seed_users(conn, users)
        bad = {f"user{i}@example.com" for i in rng.sample(range(1, users + 1), culprits)}
        async with FakeApiProcess(flavour="drip", auth="basic", account_id=ACCOUNT, limit_requests=50) as api:
            api.reject_emails = frozenset(bad)
            config = write_config(
                log.with_suffix(".toml"),
                url,
                api.url,
                api={
                    "auth": "basic",
                    "account_id": ACCOUNT,
                    "batch_path": "/v2/{account_id}/subscribers/batches",
                },
                limits={"requests": 50, "window": 2.0, "margin": 0.1, "isolate_share": 0.1},
                source={"poll_interval": 0.2, "lookback": 3.0},
                retry={"attempts": 3, "backoff": 0.3},
                log={"level": "INFO", "format": "json"},
            )
            began = time.perf_counter()
            code = await run_daemon(config, timeout=600, log=log)
            took = time.perf_counter() - began
            batches = await conn.fetchval(
                "SELECT count(*) FROM usersync.batches WHERE cardinality(user_ids) > 0"
            )
            isolating = await conn.fetchval("SELECT count(*) FROM usersync.requests WHERE kind = 'isolate'")
            dead = await conn.fetchval(
                "SELECT count(*) FROM usersync.failures, unnest(user_ids) WHERE resolved_at IS NULL"
            )
            extra = len(api.requests) - batches
            print(
                f"exit {code}: {len(api.state):,} delivered, {dead} dead-lettered of {culprits} culprits;"
                f" {len(api.requests)} requests for {batches} batches = {extra} extra"
                f" ({isolating} isolation); {api.violations} violations; {took:.1f} s",
                flush=True,
            )
            return extra
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--culprits", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=8)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    logs = Path(tempfile.mkdtemp(prefix="usersyncd-isolate-"))
    async with database() as url:
        extras = [
            await one_run(url, args.users, args.culprits, rng, logs / f"run{run}.log")
            for run in range(args.runs)
        ]
    print(f"median: {median([float(e) for e in extras]):.0f} extra requests for {args.culprits} culprits")


if __name__ == "__main__":
    asyncio.run(main())
