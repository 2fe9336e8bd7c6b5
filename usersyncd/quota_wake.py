"""Wake-ups for the quota's waiters, across processes (LISTEN/NOTIFY).

A waiter sleeps until the slot it computed frees or its pause ends. Sending may become possible
earlier: a slot released unused, a credentials pause resumed, a learnt budget that grew. The
transaction that does it sends a NOTIFY (delivered only if it commits, after its changes are
visible); every process waiting for a slot LISTENs on one connection of its pool and wakes its
waiters, which look at the ledger again. The connection is held only while someone waits, so
an idle process or a shutdown holds none. If it is lost, the waiters are woken once it listens
again (they may have missed a notification); meanwhile they sleep at most `RECHECK` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
from loguru import logger

from usersyncd import db

CHANNEL = "usersyncd_quota"  # the payload is the state schema: one channel for every pipeline
KEEPALIVE = 10.0  # seconds between checks that the listening connection still works
READY_WAIT = 2.0  # seconds a waiter waits for the listener before looking without it
RECHECK = 5.0  # seconds a waiter sleeps at most while no connection listens


class Wakeups:
    """This process's side of the quota wake-ups: one event per generation of waiters."""

    def __init__(self, pool: asyncpg.Pool, schema: str, on_wake: Callable[[], None]) -> None:
        self._pool = pool
        self._schema = schema
        self._on_wake = on_wake  # wakes this process's waiters
        self._waiters = 0
        self._idle: asyncio.Event | None = None  # set when nobody waits
        self._listening: asyncio.Event | None = None  # set while LISTEN is in force
        self._task: asyncio.Task[None] | None = None

    @property
    def listening(self) -> bool:
        return self._listening is not None and self._listening.is_set()

    @contextlib.asynccontextmanager
    async def waiting(self, stop: asyncio.Event | None = None) -> AsyncIterator[None]:
        """While inside, notifications from other processes wake this one's waiters. On entry,
        waits (briefly, or until `stop`) until LISTEN is in force: a look after that misses nothing."""
        if self._idle is None or self._listening is None:
            self._idle, self._listening = asyncio.Event(), asyncio.Event()
        self._waiters += 1
        self._idle.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen(), name="quota-listener")
        try:
            await sleep(READY_WAIT, self._listening, stop)
            yield
        finally:
            self._waiters -= 1
            if self._waiters == 0:
                self._idle.set()

    async def aclose(self) -> None:
        """Stop listening now (the waiters left, or are being cancelled)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen(self) -> None:
        assert self._idle is not None and self._listening is not None
        delay = 0.2
        while self._waiters:
            try:
                async with self._pool.acquire() as conn:
                    await self._serve(conn)
                delay = 0.2
            except Exception as exc:  # never fatal: the waiters still look every RECHECK seconds
                logger.bind(retry_in=delay).debug("quota listener: not listening: {}", exc)
                self._listening.clear()
                if not self._waiters:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), delay)
                delay = min(delay * 2, db.CONNECT_BACKOFF_MAX)

    async def _serve(self, conn: Any) -> None:
        """LISTEN on `conn` until nobody waits or the connection fails."""
        assert self._idle is not None and self._listening is not None
        lost = asyncio.Event()

        def terminated(_: object) -> None:
            lost.set()

        conn.add_termination_listener(terminated)
        await conn.add_listener(CHANNEL, self._notified)
        try:
            self._listening.set()
            self._on_wake()  # a notification may have come while nobody listened: look again
            while self._waiters and not lost.is_set():
                await sleep(KEEPALIVE, self._idle, lost)
                if self._waiters and not lost.is_set():  # a silent network can leave it dead: ask
                    await conn.fetchval("SELECT 1", timeout=KEEPALIVE)
            if lost.is_set():
                raise asyncpg.exceptions.ConnectionDoesNotExistError("listening connection closed")
        finally:
            self._listening.clear()
            conn.remove_termination_listener(terminated)
            if not conn.is_closed():
                with contextlib.suppress(*db.CONNECTION_ERRORS):
                    await conn.remove_listener(CHANNEL, self._notified)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload == self._schema:
            self._on_wake()


async def sleep(delay: float, *events: asyncio.Event | None) -> None:
    """Sleep `delay` seconds on the event loop, or less if one of `events` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events if event is not None]
    if not waiters:
        await asyncio.sleep(delay)
        return
    try:
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
