"""CPU benchmark (issue 9): the daemon's CPU time per user synced, end to end.

    python bench/cpu.py [--users 100000] [--runs 3] [--json bench/results/cpu.json]

Per run: a fresh database seeded with N users, the fake API in a process of its own, and the
real daemon (`run --once`, quota wide open, batches of 1,000) in a child process until the
backlog is drained. The daemon's CPU time (user + sys) comes from `wait4()` on that child alone,
so neither the fake API nor PostgreSQL counts; its peak RSS is VmHWM in /proc, read every 10 ms
(ru_maxrss would count the pages of this process, copied by the fork before the exec). Also measured once: the same daemon
on an empty table (start-up and shutdown), so that "marginal" is the cost of the users alone.
Prints each run and the medians; writes the medians and the runs as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from common import REPO, database, median, seed_users, write_config

from usersyncd.fakeapi import FakeApiProcess

# seeded rows are a day old: a short lookback lets `--once` end as soon as they are sent
SOURCE = {"poll_interval": 0.2, "lookback": 1.0}
WRAP: list[str] = []  # --wrap: e.g. a profiler in front of the daemon's command
WIDE_OPEN = {"requests": 1_000_000, "window": 1.0, "margin": 0.0, "batch_size": 1000}


def run_measured(config: Path, log: Path, timeout: float) -> dict[str, float]:
    """`usersyncd run --once` in a child; its own rusage via wait4 (not the fake API's)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*WRAP, sys.executable, "-m", "usersyncd", "run", "--once", "--config", str(config)],
            stdout=out,
            stderr=out,
        )
        began = time.perf_counter()
        deadline = began + timeout
        peak_kib = 0
        while True:
            peak_kib = max(peak_kib, vm_hwm_kib(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise SystemExit(f"daemon did not finish in {timeout} s; see {log}")
            time.sleep(0.01)
        wall = time.perf_counter() - began
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"daemon exited {code}; see {log}")
    return {
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "wall_s": wall,
        # not ru_maxrss: it counts the bench's own pages, copied by the fork before exec
        "peak_rss_mb": (peak_kib or usage.ru_maxrss) / 1024,
    }


def vm_hwm_kib(pid: int) -> int:
    """The process's peak resident set since exec (VmHWM), polled: 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def one_run(users: int) -> dict[str, float]:
    async with database() as url:
        conn = await asyncpg.connect(url)
        await seed_users(conn, users)
        await conn.execute("ANALYZE users")
        await conn.close()
        api = FakeApiProcess(api_key="bench-key")  # in a process of its own, not measured
        await api.start()
        tmp = Path(tempfile.mkdtemp(prefix="usersyncd-bench-cpu-"))
        config = write_config(
            tmp / "bench.toml",
            url,
            api.url,
            limits=WIDE_OPEN,
            source=SOURCE,
            log={"level": "INFO"},
            api={"key": "bench-key"},
        )
        try:
            result = await asyncio.to_thread(run_measured, config, tmp / "daemon.log", 1800)
        finally:
            await api.stop()
    sent = sum(len(r.subscribers) for r in api.requests if r.status == 202)
    if sent != users:
        raise SystemExit(f"the API accepted {sent} users of {users}; see {tmp / 'daemon.log'}")
    result["users"] = users
    result["cpu_us_per_user"] = result["cpu_s"] / users * 1e6
    result["users_per_s"] = users / result["wall_s"]
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "cpu.json")
    parser.add_argument("--wrap", default="", help='e.g. "py-spy record -f raw -r 200 -o out.txt --"')
    args = parser.parse_args()
    WRAP[:] = shlex.split(args.wrap)
    empty = await one_run_empty()
    print(f"empty table: {empty['cpu_s']:.2f} CPU-s (start-up and shutdown)", flush=True)
    runs = []
    for n in range(args.runs):
        result = await one_run(args.users)
        result["marginal_us_per_user"] = (result["cpu_s"] - empty["cpu_s"]) / args.users * 1e6
        runs.append(result)
        print(f"run {n + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()), flush=True)
    keys = [
        "cpu_us_per_user",
        "marginal_us_per_user",
        "user_s",
        "sys_s",
        "users_per_s",
        "wall_s",
        "peak_rss_mb",
    ]
    medians = {k: median([r[k] for r in runs]) for k in keys}
    print(
        f"\n{'users':>10} {'µs CPU/user':>12} {'marginal':>9} {'user s':>7} {'sys s':>6} {'users/s':>9} {'wall s':>7} {'peak RSS MB':>12}"
    )
    print(
        f"{args.users:>10,} {medians['cpu_us_per_user']:>12.1f} {medians['marginal_us_per_user']:>9.1f}"
        f" {medians['user_s']:>7.2f} {medians['sys_s']:>6.2f} {medians['users_per_s']:>9,.0f}"
        f" {medians['wall_s']:>7.2f} {medians['peak_rss_mb']:>12.1f}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"users": args.users, "empty": empty, "median": medians, "runs": runs}, indent=2) + "\n"
    )
    print(f"written: {args.json}")


async def one_run_empty() -> dict[str, float]:
    """The daemon on a table with no users: what start-up and shutdown cost."""
    async with database() as url:
        conn = await asyncpg.connect(url)
        await seed_users(conn, 0)
        await conn.close()
        api = FakeApiProcess(api_key="bench-key")
        await api.start()
        tmp = Path(tempfile.mkdtemp(prefix="usersyncd-bench-cpu-"))
        config = write_config(
            tmp / "bench.toml",
            url,
            api.url,
            limits=WIDE_OPEN,
            source=SOURCE,
            log={"level": "INFO"},
            api={"key": "bench-key"},
        )
        try:
            return await asyncio.to_thread(run_measured, config, tmp / "daemon.log", 300)
        finally:
            await api.stop()


if __name__ == "__main__":
    asyncio.run(main())
