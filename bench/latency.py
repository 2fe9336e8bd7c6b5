"""Change latency benchmark (issue 9, issue 11): from a committed UPDATE to the request that
carries it, timed at the fake API (a process of its own; both clocks are the system-wide
CLOCK_MONOTONIC).

    python bench/latency.py [--updates 200] [--poll-interval 2.0] [--scenarios poll,notify,wave]

Scenarios, each on a fresh database with the real daemon (`usersyncd run`) in a child process
and an empty backlog at the start (`start_from = "now"`):
- poll:   quota free, polling only. Bound: poll_interval + 1 s.
- notify: quota free, `source.notify_channel` with the trigger `usersyncd trigger-sql` prints.
          Bound: 250 ms.
- wave:   one statement touches 20,000 rows' updated_at while running; they drain at full quota
          (compressed: 10 requests per 10 s window, so about 20 s of draining) and the single
          changes are made during it (other users). Bound (G11): poll_interval + one slot + 1 s.
- wave-notify: the same with the trigger. Bound: one slot + 1 s.
Updates are spread at random, `--spacing` seconds apart on average (`--wave-spacing` in a wave,
so that all of them fall within it; each one user, each user once), at every phase of the poll. Prints p50 / p99 / max per scenario; writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from common import REPO, database, seed_users, write_config

from usersyncd import notify
from usersyncd.config import load_config
from usersyncd.fakeapi import FakeApiProcess

FREE = {"requests": 1_000_000, "window": 1.0, "margin": 0.0, "batch_size": 1000}
WAVE_LIMITS = {"requests": 10, "window": 10.0, "margin": 0.1, "batch_size": 1000}
CHANNEL = "usersyncd_users"


async def scenario(
    name: str, *, updates: int, poll_interval: float, spacing: float, wave: int
) -> dict[str, Any]:
    notified = name.endswith("notify")
    waving = name.startswith("wave")
    limits = WAVE_LIMITS if waving else FREE
    singles = list(range(wave + 1, wave + 1 + updates))  # never in the wave
    async with database() as url:
        conn = await asyncpg.connect(url)
        await seed_users(conn, wave + updates)
        await conn.execute("ANALYZE users")
        api = FakeApiProcess(api_key="bench-key")
        await api.start()
        if waving:
            api.limit_requests, api.window = limits["requests"], limits["window"]
        tmp = Path(tempfile.mkdtemp(prefix="usersyncd-bench-latency-"))
        source = {"poll_interval": poll_interval, "lookback": 2.0, "start_from": "now"}
        if notified:
            source["notify_channel"] = CHANNEL
        config = write_config(
            tmp / "bench.toml",
            url,
            api.url,
            limits=limits,
            source=source,
            log={"level": "INFO"},
            api={"key": "bench-key"},
        )
        if notified:
            await conn.execute(notify.trigger_sql(load_config(config, environ={}).source))
        log = tmp / "daemon.log"
        out = open(log, "wb")
        daemon = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "usersyncd", "run", "--config", str(config), stdout=out, stderr=out
        )
        try:
            await wait_for_log(log, "listening for changes" if notified else "usersyncd ready")
            await asyncio.sleep(2 * poll_interval)  # running and idle: the seeded rows are older
            result: dict[str, Any] = {"scenario": name, "poll_interval_s": poll_interval}
            if waving:
                wave_at = time.monotonic()
                await conn.execute(
                    "UPDATE users SET name = name || ' (wave)', updated_at = clock_timestamp() WHERE id <= $1",
                    wave,
                )
                await api.wait_for(lambda a: a.accepted >= 1, timeout=60)  # the wave is draining
            changed = await change_users(conn, singles, spacing)
            await api.wait_for(
                lambda a: all(a.state.get(e, {}).get("name") == n for e, (n, _) in changed.items()),
                timeout=120,
                interval=0.2,
            )
            delays = arrival_delays(api, changed)
            result |= summary(delays)
            result["delays_ms"] = [round(d * 1000, 1) for d in delays]  # in the order of the updates
            result["log"] = str(log)
            slot = (limits["window"] + limits["margin"]) / limits["requests"]
            # G11: a poll (none when notified) and a slot, a second; 250 ms notified with quota free
            poll = 0.0 if notified else poll_interval
            result["bound_s"] = poll + slot + 1.0 if waving else (0.25 if notified else poll + 1.0)
            if waving:
                last_single = max(r.arrived for r in api.requests if set(r.emails) & changed.keys())
                await api.wait_for(
                    lambda a: (
                        sum(len(r.subscribers) for r in a.requests if r.status == 202) >= wave + updates
                    ),
                    timeout=300,
                    interval=0.5,
                )
                wave_requests = [r for r in api.requests if r.arrived >= wave_at]
                result["wave_requests_after_last_single"] = sum(
                    1 for r in wave_requests if r.arrived > last_single
                )
                result["wave_drain_s"] = wave_requests[-1].arrived - wave_requests[0].arrived
                result["wave_paced_minimum_s"] = (len(wave_requests) - 1) * slot
                result["violations"] = api.violations
        finally:
            daemon.send_signal(signal.SIGTERM)
            await asyncio.wait_for(daemon.wait(), 60)
            out.close()
            await api.stop()
            await conn.close()
    return result


async def change_users(
    conn: asyncpg.Connection, ids: list[int], spacing: float
) -> dict[str, tuple[str, float]]:
    """Change each user once, at random moments `spacing` apart on average; email -> (the new
    name, when its commit returned)."""
    changed = {}
    for user_id in ids:
        await asyncio.sleep(random.uniform(0, 2 * spacing))
        name = f"changed {user_id} {random.random()}"
        await conn.execute(
            "UPDATE users SET name = $2, updated_at = clock_timestamp() WHERE id = $1", user_id, name
        )
        changed[f"user{user_id}@example.com"] = (name, time.monotonic())
    return changed


def arrival_delays(api: FakeApiProcess, changed: dict[str, tuple[str, float]]) -> list[float]:
    """Seconds from each commit to the arrival of the first request that carried its data."""
    first: dict[str, float] = {}
    for request in api.requests:  # in arrival order
        for sub in request.subscribers:
            email = sub.get("email")
            if email in changed and email not in first and sub.get("name") == changed[email][0]:
                first[email] = request.arrived
    return [first[email] - at for email, (_, at) in changed.items()]


def summary(delays: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(delays, n=100, method="inclusive")
    return {
        "updates": len(delays),
        "p50_ms": statistics.median(delays) * 1000,
        "p99_ms": cuts[98] * 1000,
        "max_ms": max(delays) * 1000,
    }


async def wait_for_log(log: Path, message: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while message not in await asyncio.to_thread(log.read_text, errors="replace"):
        if time.monotonic() > deadline:
            raise SystemExit(f"no {message!r} in {log} after {timeout} s")
        await asyncio.sleep(0.1)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--poll-interval", type=float, default=2.0)
    parser.add_argument("--spacing", type=float, default=0.1, help="mean seconds between two updates")
    parser.add_argument(
        "--wave-spacing", type=float, default=0.05, help="the same during a wave (all of them within it)"
    )
    parser.add_argument("--wave", type=int, default=20_000, help="rows the wave touches")
    parser.add_argument("--scenarios", default="poll,notify,wave,wave-notify")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "latency.json")
    args = parser.parse_args()
    results = []
    for name in args.scenarios.split(","):
        result = await scenario(
            name,
            updates=args.updates,
            poll_interval=args.poll_interval,
            spacing=args.wave_spacing if name.startswith("wave") else args.spacing,
            wave=args.wave if name.startswith("wave") else 0,
        )
        results.append(result)
        print(
            f"{name}: "
            + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in result.items()
                if k != "delays_ms"
            ),
            flush=True,
        )
    print(
        f"\n{'scenario':<12} {'updates':>7} {'poll s':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'bound ms':>8} {'ok':>3}"
    )
    for r in results:
        ok = "yes" if r["p99_ms"] <= r["bound_s"] * 1000 else "NO"
        print(
            f"{r['scenario']:<12} {r['updates']:>7} {r['poll_interval_s']:>6.1f} {r['p50_ms']:>7.0f} {r['p99_ms']:>7.0f}"
            f" {r['max_ms']:>7.0f} {r['bound_s'] * 1000:>8.0f} {ok:>3}"
        )
    for r in results:
        if "wave_drain_s" in r:
            print(
                f"{r['scenario']}: wave drained in {r['wave_drain_s']:.1f} s (paced minimum {r['wave_paced_minimum_s']:.1f} s),"
                f" {r['wave_requests_after_last_single']} wave requests after the last single change, violations {r['violations']}"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(f"written: {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
