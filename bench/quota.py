"""Quota benchmark (SPEC G1, G2): drain N users against the fake API with a compressed window.

    python bench/quota.py [--users 100000] [--requests 10] [--window 3.0] [--runs 3]
                          [--batch-size 1000] [--json bench/results/quota.json]

Issue 9's compressed drain: `--users 100000 --requests 50 --window 5` (a slot every 0.101 s,
1,000 users each): the daemon's CPU per batch must fit in a slot, or the drain falls behind
the pace.

Prints per run and as medians: requests, violations (arrivals over the limit in a rolling
window, counted by the fake API), max requests in any window / limit, users per request,
quota utilisation and drain time / theoretical minimum. The fake API runs in a process of its
own, so nothing here delays its arrival stamps; run it on an idle machine: these are the 1 %
figures of G2 that the tests leave to it.

- utilisation: requests made / requests the quota allowed between the first and the last start,
  at L per (window + margin): 1 + L * elapsed / (window + margin).
- theoretical minimum: N requests at full quota, L per window (the API's own limit, no margin):
  the last starts (N - 1) * window / L after the first (SPEC: 50,000 users an hour, so
  2,000,000 users take about 40 h). The backlog is paced one slot apart, so the ratio is about
  (window + margin) / window = 1.01.
- paced minimum: what usersyncd's own pace allows, one slot apart: (N - 1) * (window + margin)
  / L. drain / paced is the time lost to the daemon itself (1.00: every slot used on time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

import asyncpg
from common import REPO, database, median, run_daemon, seed_users, write_config

from usersyncd.fakeapi import FakeApiProcess


async def one_run(users: int, requests: int, window: float, batch_size: int) -> dict[str, float]:
    margin = window * 0.01
    async with database() as url:
        conn = await asyncpg.connect(url)
        await seed_users(conn, users)
        await conn.close()
        # in a process of its own: this loop's work must not delay the arrival stamps measured
        api = FakeApiProcess(api_key="bench-key", limit_requests=requests, window=window)
        await api.start()
        tmp = Path(tempfile.mkdtemp(prefix="usersyncd-bench-"))
        config = write_config(
            tmp / "bench.toml",
            url,
            api.url,
            limits={"requests": requests, "window": window, "margin": margin, "batch_size": batch_size},
            source={"poll_interval": 0.2},
            retry={"backoff": window / 10},
            log={"level": "INFO"},
            api={"key": "bench-key"},
        )
        try:
            code = await run_daemon(config, timeout=600, log=tmp / "daemon.log")
        finally:
            await api.stop()  # reads what the fake recorded, then ends it
    if code != 0:
        raise SystemExit(f"daemon exited {code}; see {tmp / 'daemon.log'}")
    ok = [r for r in api.requests if r.status == 202]
    n = len(api.requests)
    starts = sorted(r.arrived for r in api.requests)
    elapsed = starts[-1] - starts[0]
    minimum = (n - 1) * window / requests
    paced = (n - 1) * (window + margin) / requests
    sizes = [len(r.subscribers) for r in ok]
    full = sum(1 for s in sizes if s == batch_size)
    allowed = 1 + requests * elapsed / (window + margin)
    return {
        "requests": n,
        "violations": api.violations,
        "max_in_window/limit": api.max_arrivals_in_any_window() / requests,
        "users_per_request": sum(sizes) / max(len(sizes), 1),
        "full_batches": full / max(len(sizes), 1),
        "utilisation": n / allowed,
        "drain_s": elapsed,
        "minimum_s": minimum,
        "drain/minimum": elapsed / minimum if minimum else float("nan"),
        "paced_s": paced,
        "drain/paced": elapsed / paced if paced else float("nan"),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "quota.json")
    args = parser.parse_args()
    results = []
    for run in range(args.runs):
        result = await one_run(args.users, args.requests, args.window, args.batch_size)
        results.append(result)
        print(f"run {run + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()), flush=True)
    medians = {k: median([r[k] for r in results]) for k in results[0]}
    print(
        f"\n{'users':>9} {'L/window':>9} {'requests':>8} {'violations':>10} {'max/limit':>9}"
        f" {'users/req':>9} {'drain s':>8} {'paced s':>8} {'drain/paced':>11} {'drain/min':>9}"
    )
    print(
        f"{args.users:>9,} {f'{args.requests}/{args.window:g}s':>9} {medians['requests']:>8.0f}"
        f" {max(r['violations'] for r in results):>10.0f} {medians['max_in_window/limit']:>9.2f}"
        f" {medians['users_per_request']:>9.0f} {medians['drain_s']:>8.2f} {medians['paced_s']:>8.2f}"
        f" {medians['drain/paced']:>11.3f} {medians['drain/minimum']:>9.3f}"
    )
    print("(medians of the runs; violations: the most in any run)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "users": args.users,
                "requests": args.requests,
                "window": args.window,
                "batch_size": args.batch_size,
                "median": medians,
                "runs": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written: {args.json}")


if __name__ == "__main__":
    asyncio.run(main())
