"""The chaos soak, long form (issue 10): `python bench/soak.py --minutes 30 [--seed N]`.

Three `usersyncd run` replicas on one PostgreSQL, the fake API in its own process, a writer
changing the table and faults at random for the given time; then the guarantees checked at
quiescence. Prints the faults injected, users delivered, violations and the seed; writes JSON.
Ctrl-C (or SIGTERM) ends the faults early; the checks still run. Exit 1 when a guarantee
failed (the seed reproduces the run's mix of faults and writes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "soak"))

from soak_harness import Settings, soak  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="of faults (default 30)")
    parser.add_argument("--seed", type=int, default=None, help="reproduce a run (default: random)")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--settle", type=float, default=300.0, help="seconds allowed to reach quiescence")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="logs and configs (default: a new temp dir)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=REPO / "bench" / "results" / "soak.json",
        help="where to write the report",
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        seed=seed, seconds=args.minutes * 60, users=args.users, settle=args.settle, workdir=args.workdir
    )
    report = asyncio.run(
        soak(settings, out=lambda line: print(line, flush=True), stop_on=(signal.SIGINT, signal.SIGTERM))
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
