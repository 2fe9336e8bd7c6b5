"""`usersyncd status --watch`: the status, refreshed in place on a terminal until Ctrl-C.

On a terminal the snapshot is redrawn in place (rich's live display), the way operators watch
Horizon or `pg_stat_activity`; elsewhere (a pipe, a log) each refresh is printed after the last,
under a time stamp, or as one JSON object a line with `--json`. A lost database is shown and
waited out, never fatal: the point of watching is to see it come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TextIO

import asyncpg
from rich.console import Console
from rich.live import Live
from rich.text import Text

from usersyncd import db, status
from usersyncd.config import Config
from usersyncd.errors import UserSyncError


async def watch(
    pool: asyncpg.Pool, config: Config, *, every: float, out: TextIO, as_json: bool = False
) -> int:
    """Refresh every `every` seconds until SIGINT/SIGTERM; 0 then."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if out.isatty() and not as_json:
            console = Console(file=out)
            with Live(Text("reading…"), console=console, auto_refresh=False, transient=False) as live:
                while not stop.is_set():
                    live.update(
                        Text(
                            f"{_stamp()}  (every {every:g} s, Ctrl-C to stop)\n\n{await _snapshot(pool, config)}"
                        )
                    )
                    live.refresh()
                    await _wait(stop, every)
        else:
            while not stop.is_set():
                if as_json:
                    print(await _json_line(pool, config), file=out, flush=True)
                else:
                    print(f"--- {_stamp()}\n{await _snapshot(pool, config)}\n", file=out, flush=True)
                await _wait(stop, every)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


async def _snapshot(pool: asyncpg.Pool, config: Config) -> str:
    try:
        return status.render_text(await status.collect(pool, config))
    except (UserSyncError, asyncpg.PostgresError, *db.CONNECTION_ERRORS) as exc:
        return f"database unreachable: {db.redact_dsn(_first_line(exc))} (retrying)"


async def _json_line(pool: asyncpg.Pool, config: Config) -> str:
    try:
        snapshot = await status.collect(pool, config)
    except (UserSyncError, asyncpg.PostgresError, *db.CONNECTION_ERRORS) as exc:
        return json.dumps({"time": _stamp(), "error": db.redact_dsn(_first_line(exc))})
    data = asdict(snapshot) | {"backlog": snapshot.backlog, "time": _stamp()}
    return json.dumps(data, default=str, separators=(",", ":"))


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def _stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
