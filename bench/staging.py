"""Poller benchmark (SPEC §9, issue 9): staging rate, memory, and time to the first request.

    python bench/staging.py [--rows 1000000] [--runs 3] [--json bench/results/staging-1000000.json]

Seeds the table once (one INSERT ... SELECT from generate_series), then:

1. staging, per run: a fresh state schema, the poller in this process with no lookahead limit,
   polled until caught up (every row read once and staged into sync_state): rows per second.
   Staging is SQL on the server; this process's peak RSS shows that nothing grows with the table.
2. the daemon, once: `usersyncd run` in a child process (default limits: 50 requests an hour,
   batches of 1,000) against the fake API in a process of its own, on a fresh state schema:
   seconds from the spawn to the first request's arrival at the fake (both stamped with the
   system-wide monotonic clock), and the daemon's peak RSS (VmHWM in /proc, polled) over its
   first `--settle` seconds, by when its poller has staged its lookahead.

Prints a table and writes JSON. Compare `--rows 1000000` with `--rows 5000000`: the figures
should not depend on the table's size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from common import REPO, database, median, seed_users, write_config
from cpu import vm_hwm_kib

from usersyncd import db, poller, source
from usersyncd.config import Config
from usersyncd.fakeapi import FakeApiProcess


async def stage_all(url: str, conn: asyncpg.Connection, pool: asyncpg.Pool, rows: int, run: int) -> float:
    """Stage every row once into a fresh schema; rows per second."""
    schema = f"bench_{run}"
    async with pool.acquire() as c:
        await db.migrate(c, schema)
    config = Config.model_validate(
        {
            "database": {"url": url, "state_schema": schema},
            "api": {"url": "http://127.0.0.1:9"},
            # rows are a day old: no lookback, so the walk ends when the last page is read
            # (with one, a first start's backfill finishes no sooner than lookback after it);
            # one poll stages them all (a poll's share for the paced lane is poll_interval / 2)
            "source": {"lookback": 0.0, "poll_interval": 7200.0},
        }
    )
    service = poller.UserSyncService(
        config, pool, await source.inspect(conn, config.source), work_ready=asyncio.Event()
    )
    service.lookahead = 10 * rows  # stage everything: measure the scan, not the limit
    await service.init_cursors()
    began = time.perf_counter()
    staged = 0
    while True:
        result = await service.poll_once()
        staged += result.staged
        if result.caught_up:
            break
    elapsed = time.perf_counter() - began
    await conn.execute(f"DROP SCHEMA {db.quote_ident(schema)} CASCADE")
    if staged != rows:
        raise SystemExit(f"staged {staged:,} of {rows:,} rows")
    return staged / elapsed


async def first_request(url: str, settle: float) -> dict[str, float]:
    """`usersyncd run` on the seeded table: time to the first request, peak RSS while it settles."""
    api = FakeApiProcess(api_key="bench-key")
    await api.start()
    tmp = Path(tempfile.mkdtemp(prefix="usersyncd-bench-staging-"))
    config = write_config(
        tmp / "bench.toml",
        url,
        api.url,
        database={"state_schema": "bench_daemon"},
        log={"level": "INFO"},
        api={"key": "bench-key"},
    )
    log = tmp / "daemon.log"
    try:
        with open(log, "wb") as out:
            spawned = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "usersyncd", "run", "--config", str(config), stdout=out, stderr=out
            )
            peak_kib = 0
            first: float | None = None
            try:
                while time.monotonic() < spawned + 120:
                    peak_kib = max(peak_kib, vm_hwm_kib(proc.pid))
                    if proc.returncode is not None:
                        raise SystemExit(f"daemon exited {proc.returncode}; see {log}")
                    if first is None and api.requests:
                        first = api.requests[0].arrived - spawned
                    if first is not None and time.monotonic() > spawned + first + settle:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise SystemExit(f"no request within 120 s; see {log}")
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 30)
    finally:
        await api.stop()
    assert first is not None
    staged = 0
    conn = await asyncpg.connect(url)
    try:
        staged = await conn.fetchval("SELECT count(*) FROM bench_daemon.sync_state")
        await conn.execute("DROP SCHEMA bench_daemon CASCADE")
    finally:
        await conn.close()
    return {"first_request_s": first, "daemon_peak_rss_mb": peak_kib / 1024, "daemon_staged": staged}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--settle", type=float, default=5.0, help="seconds the daemon runs after its first request"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    path = args.json or REPO / "bench" / "results" / f"staging-{args.rows}.json"
    async with database() as url:
        conn = await asyncpg.connect(url)
        began = time.perf_counter()
        await seed_users(conn, args.rows)
        await conn.execute("ANALYZE users")
        seeded = time.perf_counter() - began
        print(f"seeded {args.rows:,} rows in {seeded:.1f} s", flush=True)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
        rates = []
        for run in range(args.runs):
            rates.append(await stage_all(url, conn, pool, args.rows, run))
            print(f"run {run + 1}: {rates[-1]:,.0f} rows/s staged", flush=True)
        await pool.close()
        staging_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        daemon = await first_request(url, args.settle)
        await conn.close()
    result = {
        "rows": args.rows,
        "seed_s": seeded,
        "staged_rows_per_s": median(rates),
        "staging_peak_rss_mb": staging_rss,
        **daemon,
        "runs": rates,
    }
    print(
        f"\n{'rows':>10} {'staged rows/s':>14} {'staging RSS MB':>15} {'first request s':>16}"
        f" {'daemon RSS MB':>14} {'daemon staged':>14}"
    )
    print(
        f"{args.rows:>10,} {result['staged_rows_per_s']:>14,.0f} {staging_rss:>15.0f}"
        f" {daemon['first_request_s']:>16.2f} {daemon['daemon_peak_rss_mb']:>14.0f}"
        f" {daemon['daemon_staged']:>14,.0f}"
    )
    print(
        f"(staged rows/s: median of {args.runs} runs; daemon: one run, {args.settle:g} s after its first request)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    asyncio.run(main())
