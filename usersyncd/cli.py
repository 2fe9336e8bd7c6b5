"""Command line: argument parsing only; each command calls the module that holds its logic.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from loguru import logger

from usersyncd import __version__, config, db, dsn, log
from usersyncd.errors import ConfigError, UserSyncError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, metavar="PATH", help="the TOML config file")
    parser.add_argument(
        "--database-url", metavar="URL", help="overrides database.url and USERSYNCD_DATABASE_URL"
    )
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key (the value is read as TOML), e.g. --set limits.window=2.0",
    )


def load(args: argparse.Namespace) -> config.Config:
    """The configuration with flag overrides applied, and logging set up from it; what deserves
    a warning is logged once, at start."""
    overrides: dict[str, Any] = dict(config.parse_assignment(a) for a in args.assignments)
    if args.database_url:
        overrides["database.url"] = args.database_url
    loaded = config.load_config(args.config, overrides=overrides)
    log.configure(loaded.log.level, loaded.log.format, secrets=loaded.secrets)
    for warning in [*loaded.warnings(), *_secrets_on_command_line(args)]:
        logger.warning(warning)
    return loaded


def _secrets_on_command_line(args: argparse.Namespace) -> list[str]:
    """Secrets given as arguments: every local user reads them in `ps` (/proc/PID/cmdline)."""
    found = []
    flags = [("--database-url", args.database_url)] if args.database_url else []
    flags += [(f"--set {key}", value) for key, value in map(config.parse_assignment, args.assignments)]
    for flag, value in flags:
        if flag == "--set api.key" and value:
            where = "api.key_file or USER_API_KEY"
        elif flag in ("--database-url", "--set database.url") and dsn.has_password(str(value)):
            where = "a PGPASSFILE or USERSYNCD_DATABASE_URL"
        else:
            continue
        found.append(
            f"{flag} puts a secret on the command line, readable by every local user in `ps`; use {where}"
        )
    return found


async def _migrate(cfg: config.Config) -> int:
    pool = await db.create_pool(cfg.database.url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            applied = await db.migrate(conn, cfg.database.state_schema)
            version = await db.schema_version(conn, cfg.database.state_schema)
    finally:
        await pool.close()
    if applied:
        print(f"applied migrations {', '.join(map(str, applied))}; schema version {version}")
    else:
        print(f"schema {cfg.database.state_schema!r} is up to date (version {version})")
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    return asyncio.run(_migrate(load(args)))


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load(args)
    cfg.api.require_key()
    if args.dry_run:
        from usersyncd import dryrun

        asyncio.run(dryrun.dry_run(cfg))
        return EXIT_OK
    from usersyncd import daemon

    return asyncio.run(daemon.run(cfg, once=args.once))


async def _with_pool(cfg: config.Config, action: Callable[[Any], Any]) -> Any:
    """Run `action(pool)` on a small pool; the state tables are created if missing, and must
    belong to this config's pipeline."""
    from usersyncd import pipeline

    pool = await db.create_pool(cfg.database.url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await db.migrate(conn, cfg.database.state_schema)
            await pipeline.claim(conn, cfg, record=False)
        return await action(pool)
    finally:
        await pool.close()


def cmd_trigger_sql(args: argparse.Namespace) -> int:
    from usersyncd import notify

    print(notify.trigger_sql(load(args).source), end="")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from usersyncd import status

    cfg = load(args)
    if args.watch is not None:
        from usersyncd import watch

        return asyncio.run(
            _with_pool(
                cfg, lambda pool: watch.watch(pool, cfg, every=args.watch, out=sys.stdout, as_json=args.json)
            )
        )
    snapshot = asyncio.run(_with_pool(cfg, lambda pool: status.collect(pool, cfg)))
    print(status.render_json(snapshot) if args.json else status.render_text(snapshot))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from usersyncd import checks

    cfg = load(args)
    if args.spend_slot and not args.api:
        raise ConfigError("--spend-slot goes with --api")
    return asyncio.run(checks.check(cfg, probe_api=args.api, spend_slot=args.spend_slot))


def parse_since(text: str) -> datetime:
    """An RFC 3339 time, or an age such as 90s, 30m, 2h, 7d (that long ago)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if match:
        seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return datetime.now(UTC) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text}: expected an RFC 3339 time or an age like 30m, 2h, 7d") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def cmd_failed(args: argparse.Namespace) -> int:
    from usersyncd import failures

    cfg = load(args)
    rows = asyncio.run(_with_pool(cfg, lambda pool: _open_failures(pool, cfg)))
    print(failures.to_json(rows) if args.json else failures.render_failures(rows))
    return EXIT_OK


async def _open_failures(pool: Any, cfg: config.Config) -> list[dict[str, Any]]:
    """Open failures, each `exhausted` one with its redrives so far and when the next comes (G13)."""
    from usersyncd import failures, redrive

    schema = cfg.database.state_schema
    rows = await failures.list_open(pool, schema)
    retry = cfg.retry
    counts = await redrive.counts(pool, schema, [r["id"] for r in rows if r["kind"] == "exhausted"])
    for row in rows:
        if row["id"] in counts:
            row["redrives"] = counts[row["id"]]
            due = retry.redrive_after > 0 and counts[row["id"]] < retry.redrives
            row["next_redrive_at"] = (
                row["last_failed_at"] + timedelta(seconds=retry.redrive_after) if due else None
            )
    return rows


def cmd_forget_failed(args: argparse.Namespace) -> int:
    from usersyncd import failures

    cfg = load(args)
    deleted, unknown = asyncio.run(
        _with_pool(cfg, lambda pool: failures.forget(pool, cfg.database.state_schema, args.ids))
    )
    print(f"forgot {len(deleted)} failure(s)" + (f": {', '.join(map(str, deleted))}" if deleted else ""))
    if unknown:
        print(f"usersyncd: no failure with id {', '.join(map(str, unknown))}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_replay_failed(args: argparse.Namespace) -> int:
    from usersyncd import failures, status

    if not (args.ids or args.since or args.all):
        raise ConfigError("replay-failed: say which failures: --id N ..., --since TIME or --all")
    cfg = load(args)
    since = parse_since(args.since) if args.since else None

    async def act(pool: Any) -> tuple[Any, int]:
        result = await failures.replay(
            pool,
            cfg.database.state_schema,
            ids=args.ids,
            since=since,
            all_open=args.all,
            dry_run=args.dry_run,
        )
        live = await status.live_process_count(pool, cfg.database.state_schema)
        return result, live

    result, live = asyncio.run(_with_pool(cfg, act))
    verb = "would re-queue" if args.dry_run else "re-queued"
    print(
        f"{verb} {result.users} user(s) from {len(result.failures)} failure(s)"
        + (f": {', '.join(map(str, result.failures))}" if result.failures else "")
    )
    if result.skipped:
        print(
            f"not replayed (unknown, resolved, or already being replayed): {', '.join(map(str, result.skipped))}"
        )
    if result.users and not args.dry_run:
        print(
            "they are sent with their current data through the quota by the running daemon"
            if live
            else "no usersyncd process is running: they go out at the next `usersyncd run` (or `run --once`)"
        )
    return EXIT_OK


def cmd_history(args: argparse.Namespace) -> int:
    from usersyncd import failures

    cfg = load(args)
    since = parse_since(args.since) if args.since else None
    rows = asyncio.run(
        _with_pool(
            cfg,
            lambda pool: failures.history(pool, cfg.database.state_schema, since=since, limit=args.limit),
        )
    )
    print(failures.to_json(rows) if args.json else failures.render_history(rows))
    return EXIT_OK


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _forget_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="+", type=int, metavar="ID", help="failure ids (see `usersyncd failed`)")


def _replay_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--id",
        dest="ids",
        action="append",
        type=int,
        default=[],
        metavar="N",
        help="a failure id (repeatable)",
    )
    parser.add_argument(
        "--since",
        metavar="TIME",
        help="failures last seen since TIME (RFC 3339, or an age: 30m, 2h, 7d)",
    )
    parser.add_argument("--all", action="store_true", help="every open failure")
    parser.add_argument("--dry-run", action="store_true", help="say what would be re-queued; change nothing")


def _history_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since", metavar="TIME", help="requests since TIME (RFC 3339, or an age: 30m, 2h, 7d)"
    )
    parser.add_argument(
        "--limit",
        type=_positive,
        default=1000,
        help="at most this many rows (newest first; default 1000)",
    )
    _json_option(parser)


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _status_options(parser: argparse.ArgumentParser) -> None:
    _json_option(parser)
    parser.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_positive_seconds,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C: in place on a terminal, one after another elsewhere",
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 86400:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds between 0 and 86400")
    return value


def _check_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api",
        action="store_true",
        help="also probe the API with GET api.probe_path (outside the batch quota)",
    )
    parser.add_argument(
        "--spend-slot",
        action="store_true",
        help="with --api and no api.probe_path: send one empty batch instead (costs one request of the quota)",
    )


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="drain what is pending now, then exit")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="read, validate and batch; log what would be sent; send nothing, change no state",
    )


COMMANDS: dict[
    str,
    tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None] | None],
] = {
    "run": (cmd_run, "the daemon: poll, batch and send under the quota (foreground)", _run_options),
    "replay-failed": (
        cmd_replay_failed,
        "re-queue dead-lettered users, to be sent with their current data",
        _replay_options,
    ),
    "failed": (cmd_failed, "list open failures", _json_option),
    "forget-failed": (
        cmd_forget_failed,
        "drop failures an operator has dealt with",
        _forget_options,
    ),
    "history": (
        cmd_history,
        "the request log: time, batch, users, status, duration, request ids",
        _history_options,
    ),
    "status": (cmd_status, "backlog, queue, quota, failures, pause, live workers", _status_options),
    "check": (
        cmd_check,
        "validate the config, the database, the source table and (--api) the API",
        _check_options,
    ),
    "migrate": (cmd_migrate, "create or upgrade usersyncd's own tables", None),
    "trigger-sql": (
        cmd_trigger_sql,
        "print the trigger (for the table's owner to run) that NOTIFYs source.notify_channel on changes",
        None,
    ),
}


def cmd_demo(args: argparse.Namespace) -> int:
    from usersyncd import demo

    return asyncio.run(demo.run_demo(users=args.users))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="usersyncd",
        description="Keep a subscriber API in sync with a PostgreSQL users table, under a hard quota.",
    )
    parser.add_argument("--version", action="version", version=f"usersyncd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (handler, help_text, add_options) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_options(command)
        if add_options is not None:
            add_options(command)
        command.set_defaults(handler=handler)
    demo_help = (
        "the whole pipeline on an embedded PostgreSQL and a fake API, time compressed (about a minute)"
    )
    demo = sub.add_parser("demo", help=demo_help, description=demo_help)
    demo.add_argument("--users", type=int, default=60_000, help="users to sync (default 60000)")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"usersyncd: config error: {_safe(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except UserSyncError as exc:
        print(f"usersyncd: {_safe(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except (asyncpg.PostgresError, *db.CONNECTION_ERRORS) as exc:
        # a database problem no module translated: one line, never a traceback
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"usersyncd: database error: {_safe(first)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception:
        # a bug: the traceback helps, but never with a secret in it (G9)
        print(_safe(traceback.format_exc()), end="", file=sys.stderr)
        return EXIT_FAILURE


def _safe(text: str) -> str:
    """`text` without the key or a database password (those known once the config loaded)."""
    return log.redact(db.redact_dsn(text))
