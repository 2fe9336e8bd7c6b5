"""The daemon: wiring, named and supervised tasks, signals, sd_notify, graceful shutdown (G8)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
from loguru import logger

from usersyncd import __version__, api, db, pipeline, reconcile, recover, redrive, source, status, systemd
from usersyncd.config import Config
from usersyncd.errors import DatabaseError, UserSyncError
from usersyncd.metrics import READY_TIMEOUT, Metrics, SnapshotCache
from usersyncd.poller import UserSyncService
from usersyncd.queue import Queue
from usersyncd.quota import Quota
from usersyncd.worker import Stopping, SyncUserBatch

HEARTBEAT_EVERY = 5.0  # seconds, at most: lease renewal, process heartbeat
PRUNE_EVERY = 600.0  # seconds between deletions of what is older than the retention
SCHEDULE_EVERY = 60.0  # seconds between schedule log lines (and systemd STATUS updates)
METRICS_MAX_AGE = 5.0  # seconds a database snapshot serves every /metrics scrape
CONNECT_PATIENCE = 5.0  # seconds without a database at start before systemd hears that we wait


@dataclass
class Daemon:
    """One process: a poller, `queue.concurrency` workers, a heartbeat; all share `stop`."""

    config: Config
    once: bool = False
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    )
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    busy: int = 0  # workers holding a batch right now
    ready: bool = False
    pool: asyncpg.Pool | None = None
    database_lost: bool = False

    async def run(self) -> int:
        cfg = self.config
        self.pipeline = pipeline.Pipeline.of(cfg)
        self._install_signals()
        logger.bind(
            version=__version__, worker=self.worker_id, database=db.redact_dsn(cfg.database.url)
        ).info("usersyncd starting")
        # the watchdog proves the event loop turns, from the first moment: not that the database answers
        watchdog = asyncio.create_task(systemd.watchdog(), name="watchdog")
        self.metrics = Metrics()
        self.snapshots = SnapshotCache(self._read_snapshot, max_age=METRICS_MAX_AGE)
        health = None
        try:
            if cfg.http.address is not None:
                from usersyncd.http import HealthServer  # aiohttp's server: only when listening

                health = HealthServer(
                    self.metrics, ready=self._not_ready_because, refresh=self._refresh_metrics
                )
                try:
                    await health.start(*cfg.http.address)
                except OSError as exc:
                    raise UserSyncError(
                        f"http.listen: cannot listen on {cfg.http.listen}: {exc.strerror or exc}"
                    ) from None
            # a host that never answers hangs the first attempt for the whole connect timeout
            slow = asyncio.get_running_loop().call_later(
                CONNECT_PATIENCE, self._waiting_for_database, "no answer yet"
            )
            try:
                self.pool = await db.wait_for_pool(
                    cfg.database.url,
                    min_size=1,
                    # + the change listener's connection, held while running (source.notify_channel)
                    max_size=cfg.queue.concurrency + 4 + bool(cfg.source.notify_channel),
                    stop=self.stop,
                    waiting=self._waiting_for_database,
                )
            finally:
                slow.cancel()
            if self.pool is None:
                systemd.notify("STOPPING=1")
                logger.info("stopped while waiting for the database")
                return 0
            try:
                return await self._start(self.pool)
            finally:
                client = getattr(self, "client", None)
                if client is not None:
                    await client.aclose()
                await self.pool.close()
        finally:
            if health is not None:
                await health.stop()
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)

    def _waiting_for_database(self, why: str) -> None:
        """At start, the database does not answer yet. The start is over (READY): waiting is the
        same state as a database lost mid-run, and systemd's start timeout must not kill it."""
        systemd.notify(f"READY=1\nSTATUS=waiting for the database: {db.redact_dsn(why)}")

    async def _prepare(self, pool: asyncpg.Pool) -> None:
        """Migrate, claim the schema for this pipeline, inspect the source: each step is its own
        transaction (or idempotent), so the whole is retried when the database goes away."""
        cfg = self.config
        async with pool.acquire() as conn:
            await db.migrate(conn, cfg.database.state_schema)
            await pipeline.claim(conn, cfg)
            self.source = await source.inspect(conn, cfg.source)

    async def _starting(self, step: Callable[[], Awaitable[None]], what: str) -> bool:
        """A start-up step, retried while the database is away: it may go between the pool's
        first connection and any step (G10; the chaos soak saw replicas exit 1 there). False:
        stopped meanwhile."""
        try:
            await db.retrying(step, what=what, stop=self.stop)
        except DatabaseError:
            if not self.stop.is_set():
                raise
            logger.info("stopped while waiting for the database")
            return False
        return True

    async def _start(self, pool: asyncpg.Pool) -> int:
        cfg = self.config
        if not await self._starting(lambda: self._prepare(pool), "start"):
            return 0
        if not self.source.has_keyset_index:
            logger.warning(
                "no index on ({}, {}) of {}: every poll scans the table",
                cfg.source.updated_at_column,
                cfg.source.id_column,
                cfg.source.table,
            )
        self.client = api.ExternalUserApi(cfg.api)
        self.quota = Quota(
            pool,
            cfg.limits,
            cfg.database.state_schema,
            worker=self.worker_id,
            credentials_probe_every=cfg.retry.backoff,
            request_timeout=cfg.api.timeout,
        )
        self.queue = Queue(
            pool,
            cfg.database.state_schema,
            cfg.queue.name,
            worker=self.worker_id,
            lease=cfg.queue.retry_after,
            request_timeout=cfg.api.timeout,
        )
        self.work_ready = asyncio.Event()
        self.forming = asyncio.Lock()
        self.live_ready = asyncio.Event()
        self.poller = UserSyncService(
            cfg, pool, self.source, work_ready=self.work_ready, live_ready=self.live_ready
        )
        # what start-up made (modules, config, pool, client) lives as long as the process: out of
        # the garbage collector's sight, so the collections a backlog's batches trigger skip it
        gc.freeze()
        return await self._supervise()

    async def _supervise(self) -> int:
        cfg = self.config
        if not await self._starting(self._register, "register"):
            return 0
        tasks = {
            asyncio.create_task(self.poller.run(self.stop), name="poller"),
            asyncio.create_task(self.poller.run_rereads(self.stop), name="lookback re-read"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(
                redrive.run(self.pool, cfg.database.state_schema, cfg.retry, self.stop), name="redrive"
            ),
            asyncio.create_task(
                reconcile.run(reconcile.Reconciler(cfg, self.pool, self.source), self.stop), name="reconcile"
            ),
            asyncio.create_task(self._recover_sent_emails(), name="recover sent emails"),
        }
        workers = {
            asyncio.create_task(self._work(n), name=f"worker-{n}") for n in range(cfg.queue.concurrency)
        }
        if self.once:
            tasks.add(asyncio.create_task(self._stop_when_drained(), name="once"))
        self.ready = True
        systemd.notify(f"READY=1\nSTATUS=syncing {self.pipeline.source} to {self.pipeline.api}")
        logger.bind(workers=cfg.queue.concurrency, queue=cfg.queue.name).info("usersyncd ready")

        stopper = asyncio.create_task(self.stop.wait(), name="stop")
        done, _ = await asyncio.wait({*tasks, *workers, stopper}, return_when=asyncio.FIRST_COMPLETED)
        crashed = [t for t in done if t is not stopper and t.exception() is not None]
        # after a signal (or --once), idle workers and the poller return as the stopper does:
        # only a task that returned while nobody asked to stop ended early
        finished_early = [
            t
            for t in done
            if t is not stopper
            and t.exception() is None
            and t.get_name() != "once"
            and not self.stop.is_set()
        ]
        for task in crashed:
            logger.opt(exception=task.exception()).bind(task=task.get_name()).critical(
                "task crashed; stopping: {}", task.exception()
            )
        for task in finished_early:
            logger.bind(task=task.get_name()).critical("task ended unexpectedly; stopping")
        self.stop.set()
        systemd.notify("STOPPING=1")
        logger.info("stopping: no new requests; in-flight ones get {} s", cfg.queue.shutdown_grace)

        _, late = await asyncio.wait(workers, timeout=cfg.queue.shutdown_grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for task in tasks | {stopper}:
            task.cancel()
        await asyncio.gather(*tasks, stopper, return_exceptions=True)
        released = await self._release(cancelled=bool(late))
        await self._unregister()
        logger.bind(released=released).info("usersyncd stopped")
        worker_crashes = [t for t in workers - late if not t.cancelled() and t.exception() is not None]
        return 1 if crashed or finished_early or worker_crashes else 0

    async def _recover_sent_emails(self) -> None:
        """Once per start: the emails the API holds for users sent before they were kept (G12);
        then this task has nothing more to do until the stop."""
        await recover.Recovery(self.config, self.pool, self.source).run(self.stop)
        await self.stop.wait()

    async def _work(self, n: int) -> None:
        """Run batches while there is work; wait for the poller otherwise (never spin)."""
        cfg = self.config
        assert self.pool is not None
        # Each worker claims under its own name, so it can give back exactly its own batch.
        queue = Queue(
            self.pool,
            cfg.database.state_schema,
            cfg.queue.name,
            worker=f"{self.worker_id}/w{n}",
            lease=cfg.queue.retry_after,
            request_timeout=cfg.api.timeout,
        )
        try:
            await self._batches(n, queue)
        except DatabaseError:
            if self.stop.is_set():  # the database is gone and we are stopping: not a crash (G8)
                return
            raise

    async def _batches(self, n: int, queue: Queue) -> None:
        cfg = self.config
        assert self.pool is not None
        while not self.stop.is_set():
            has_work = await db.retrying(queue.has_work, what="check work", stop=self.stop)
            if not has_work:
                self.work_ready.clear()
                await _wait_any(self.stop, self.work_ready, timeout=cfg.source.poll_interval)
                continue
            self.busy += 1
            try:
                job = SyncUserBatch(
                    cfg,
                    pool=self.pool,
                    source=self.source,
                    queue=queue,
                    quota=self.quota,
                    client=self.client,
                    stop=self.stop,
                    forming=self.forming,
                    metrics=self.metrics,
                    live_ready=self.live_ready,
                )
                await job.run(await queue.claim_open_batch())
            except Stopping:
                return
            except db.CONNECTION_ERRORS as exc:
                # the batch goes back to the queue; its users are sent again (at-least-once)
                logger.bind(worker=n, error=str(exc)).warning("database lost during a batch; releasing it")
                await db.retrying(queue.release_mine, what="release batch", stop=self.stop)
                await _wait_any(self.stop, timeout=1.0)
            finally:
                self.busy -= 1

    async def _not_ready_because(self) -> str | None:
        """Readiness (SPEC §8): None when ready, else why not."""
        if not self.ready or self.stop.is_set():
            return "starting" if not self.stop.is_set() else "stopping"
        assert self.pool is not None
        await self.pool.fetchval("SELECT 1")  # raises while the database is unreachable
        state = await self.quota.state()
        if state.paused in ("credentials", "configuration"):
            return f"sending paused: {state.pause_detail}"
        return None

    async def _read_snapshot(self) -> status.Status:
        if self.pool is None or not self.ready:
            raise DatabaseError("not connected yet")
        return await status.collect(self.pool, self.config, count_unstaged=False, exact=False)

    async def _refresh_metrics(self) -> None:
        """The gauges from a snapshot at most METRICS_MAX_AGE old, read once for every scrape."""
        snapshot = await self.snapshots.get(timeout=READY_TIMEOUT)
        if snapshot is not None:
            self.metrics.update(snapshot, quota_waits=self.quota.waits)  # a snapshot: quota is set
        self.metrics.up.set(0 if snapshot is None or self.snapshots.failed else 1)
        age = self.snapshots.age()
        self.metrics.snapshot_age.set(age if age is not None else float("nan"))

    async def _stop_when_drained(self) -> None:
        """`--once`: stop when the poller has caught up and nothing is left to send."""
        while not self.stop.is_set():
            await asyncio.sleep(0.1)
            if not self.poller.last.caught_up or self.busy:
                continue
            backlog = await self.queue.backlog()
            if backlog.live_ready == backlog.backfill_ready == backlog.open_batches == 0 and not self.busy:
                logger.info("--once: everything pending is sent")
                self.stop.set()

    async def _heartbeat(self) -> None:
        cfg = self.config
        every = min(HEARTBEAT_EVERY, cfg.queue.retry_after / 3)
        since_prune = PRUNE_EVERY
        since_schedule = SCHEDULE_EVERY
        while not self.stop.is_set():
            await db.retrying(self._beat_telling_systemd, what="heartbeat", stop=self.stop)
            since_prune += every
            if since_prune >= PRUNE_EVERY:
                since_prune = 0.0
                await db.retrying(self._prune, what="prune", stop=self.stop)
            since_schedule += every
            if since_schedule >= SCHEDULE_EVERY:
                since_schedule = 0.0
                await db.retrying(self._schedule, what="schedule", stop=self.stop)
            await _wait_any(self.stop, timeout=every)

    async def _beat_telling_systemd(self) -> None:
        """The heartbeat; while it fails, systemd's STATUS says the database is lost."""
        try:
            await self._beat()
        except db.CONNECTION_ERRORS as exc:
            self.database_lost = True
            systemd.notify(f"STATUS=database unreachable, retrying: {type(exc).__name__}")
            raise
        if self.database_lost:
            self.database_lost = False
            systemd.notify(f"STATUS=syncing {self.pipeline.source} to {self.pipeline.api} (database back)")

    async def _beat(self) -> None:
        assert self.pool is not None
        await self.queue.renew_leases()
        await self.pool.execute(
            f"UPDATE {db.quote_ident(self.config.database.state_schema)}.processes"
            " SET heartbeat_at = clock_timestamp() WHERE id = $1",
            self.worker_id,
        )

    async def _schedule(self) -> None:
        """Service-level schedule (SPEC §7): next slot, backlog, ETA; also systemd's STATUS line."""
        assert self.pool is not None
        snapshot = await status.collect(self.pool, self.config, count_unstaged=False, exact=False)
        logger.bind(
            next_slot_in=round(snapshot.next_slot_in, 3),
            backlog=snapshot.backlog,
            live=snapshot.live_ready,
            backfill=snapshot.backfill_ready,
            in_batches=snapshot.in_batches,
            quota_used=f"{snapshot.quota_used}/{snapshot.quota_limit}",
            eta_s=round(snapshot.drain_eta, 1),
            paused=snapshot.paused,
        ).info("schedule")
        systemd.notify(
            f"STATUS=backlog {snapshot.backlog} users, quota {snapshot.quota_used}/{snapshot.quota_limit},"
            f" ETA {snapshot.drain_eta:.0f} s" + (f", paused: {snapshot.paused}" if snapshot.paused else "")
        )

    async def _prune(self) -> None:
        days = self.config.database.retention_days
        await self.queue.prune(days)
        await self.quota.prune(days)
        assert self.pool is not None
        await self.pool.execute(  # rows of processes that died without a goodbye
            f"DELETE FROM {db.quote_ident(self.config.database.state_schema)}.processes"
            " WHERE heartbeat_at < clock_timestamp() - make_interval(days => 1)"
        )

    async def _register(self) -> None:
        assert self.pool is not None
        await self.pool.execute(
            f"INSERT INTO {db.quote_ident(self.config.database.state_schema)}.processes (id, host, pid, version)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
            self.worker_id,
            socket.gethostname(),
            os.getpid(),
            __version__,
        )

    async def _unregister(self) -> None:
        assert self.pool is not None
        try:
            await self.pool.execute(
                f"DELETE FROM {db.quote_ident(self.config.database.state_schema)}.processes WHERE id = $1",
                self.worker_id,
            )
        except db.CONNECTION_ERRORS:
            logger.warning("database unreachable at exit; the process row ages out")

    async def _release(self, *, cancelled: bool) -> int:
        """Batches still held go back to the queue. After a cancelled request the API may still be
        working on it, so the batch waits out the request timeout first (G6)."""
        due_in = self.config.api.timeout if cancelled else 0.0
        try:
            status = await self.queue.release_mine(due_in=due_in)
        except db.CONNECTION_ERRORS:
            logger.warning("database unreachable at exit; held batches return after their lease")
            return 0
        return int(status.split()[-1])

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()

        def first(signum: int) -> None:
            logger.bind(signal=signal.Signals(signum).name).info("signal received; shutting down")
            self.stop.set()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, second, sig)

        def second(signum: int) -> None:
            logger.bind(signal=signal.Signals(signum).name).warning("second signal; exiting now")
            os._exit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, first, sig)


async def _wait_any(*events: asyncio.Event, timeout: float) -> None:
    """Wait until any event is set or the timeout passes; a sleep on the loop, never a spin."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def run(config: Config, *, once: bool = False) -> int:
    return await Daemon(config, once=once).run()
