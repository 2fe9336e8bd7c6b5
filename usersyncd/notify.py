"""Opt-in wake-ups for the poller when the source table changes (`source.notify_channel`).

Polling alone makes a change wait up to `poll_interval` before it is even read. With a channel
set, the poller LISTENs on it and polls at once when a NOTIFY arrives; the operator installs the
trigger that sends it (`usersyncd trigger-sql`), since usersyncd needs only SELECT on the
source. Polling every `poll_interval` stays the safety net: a lost listening connection, a
trigger dropped by a migration or a notification missed cost latency, never a change. After
(re)connecting the poller polls once, for what was committed while nobody listened.

The trigger is statement-level: a bulk UPDATE of a million rows calls it once, not a million
times, and PostgreSQL folds a transaction's identical notifications into one, sent at commit
(after its rows are visible to the poll it causes).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
from loguru import logger

from usersyncd import db
from usersyncd.config import SourceConfig
from usersyncd.errors import ConfigError
from usersyncd.quota_wake import sleep

KEEPALIVE = 10.0  # seconds between checks that the listening connection still works
MIN_GAP = 0.1  # seconds between two polls that notifications cause, at least (a stream of commits)
TRIGGER = "usersyncd_notify"  # the trigger's name on the source table, and its function's


class ChangeNotices:
    """This process's LISTEN on `channel`: `changed` is set by every notification, and whenever
    listening (re)starts. Runs until `stop`; a lost connection is retried with backoff."""

    def __init__(self, pool: asyncpg.Pool, config: SourceConfig) -> None:
        self._pool = pool
        self._config = config
        self.channel = config.notify_channel
        self._looked = False  # for the trigger, once
        self.changed = asyncio.Event()
        self.listening = asyncio.Event()  # set while LISTEN is in force

    async def run(self, stop: asyncio.Event) -> None:
        delay = 0.2
        warned = False
        while not stop.is_set():
            try:
                async with self._pool.acquire() as conn:
                    await self._serve(conn, stop)
                delay = 0.2
            except Exception as exc:  # never fatal: the poller still polls every poll_interval
                log = logger.bind(channel=self.channel, retry_in=delay)
                (log.debug if warned else log.warning)(
                    "change notifications lost; polling every poll_interval until listening again: {}", exc
                )
                warned = True
                await sleep(delay, stop)
                delay = min(delay * 2, db.CONNECT_BACKOFF_MAX)
            else:
                warned = False

    async def _serve(self, conn: Any, stop: asyncio.Event) -> None:
        """LISTEN on `conn` until `stop` or the connection fails."""
        lost = asyncio.Event()

        def terminated(_: object) -> None:
            lost.set()

        conn.add_termination_listener(terminated)
        await conn.add_listener(self.channel, self._notified)
        try:
            self.listening.set()
            self.changed.set()  # a change may have come while nobody listened: poll once
            logger.bind(channel=self.channel).info("listening for changes to the source table")
            if not self._looked:
                self._looked = True
                if not await trigger_installed(conn, self._config):
                    logger.bind(channel=self.channel).warning(
                        "no usersyncd_notify trigger on {} notifies this channel: changes wait for"
                        " the next poll; `usersyncd trigger-sql` prints the SQL to install it",
                        self._config.table,
                    )
            while not stop.is_set() and not lost.is_set():
                await sleep(KEEPALIVE, stop, lost)
                if not stop.is_set() and not lost.is_set():  # a silent network can leave it dead: ask
                    await conn.fetchval("SELECT 1", timeout=KEEPALIVE)
            if lost.is_set():
                raise asyncpg.exceptions.ConnectionDoesNotExistError("listening connection closed")
        finally:
            self.listening.clear()
            conn.remove_termination_listener(terminated)
            if not conn.is_closed():
                with contextlib.suppress(*db.CONNECTION_ERRORS):
                    await conn.remove_listener(self.channel, self._notified)

    def _notified(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        self.changed.set()


async def trigger_installed(conn: asyncpg.Connection, config: SourceConfig) -> bool:
    """Whether the source table has an enabled `usersyncd_notify` trigger for the channel."""
    return bool(
        await conn.fetchval(
            """
            SELECT EXISTS (
                SELECT 1 FROM pg_trigger
                WHERE tgrelid = to_regclass($1) AND tgname = $2 AND tgenabled <> 'D'
                  AND tgargs = convert_to($3, 'UTF8') || '\\x00'::bytea
            )
            """,
            db.qualified(*config.table_parts),
            TRIGGER,
            config.notify_channel,
        )
    )


def trigger_sql(config: SourceConfig) -> str:
    """The SQL an operator runs (as the table's owner) to make the source table NOTIFY
    `config.notify_channel` on every INSERT or UPDATE statement; idempotent (re-run replaces)."""
    if not config.notify_channel:
        raise ConfigError(
            'source.notify_channel: empty; set it (e.g. notify_channel = "usersyncd_users") to print'
            " the trigger that wakes usersyncd on changes"
        )
    schema, table = config.table_parts  # quoted below: only identifiers, never in a comment
    target = db.qualified(schema, table)
    function = db.qualified(schema, TRIGGER)
    channel = config.notify_channel  # a plain lower-case identifier (validated): safe in a literal
    return f"""\
-- usersyncd: wake its poller when the source table changes (source.notify_channel = "{channel}").
-- Statement-level: one call per INSERT or UPDATE statement, however many rows it touches, and
-- PostgreSQL sends a transaction's identical notifications once, at commit. usersyncd still
-- polls every source.poll_interval: without this trigger nothing is lost, changes only wait.
-- To remove it: DROP TRIGGER {TRIGGER} ON the table, then DROP FUNCTION {TRIGGER}() in its schema.
BEGIN;
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql AS $usersyncd$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$usersyncd$;
DROP TRIGGER IF EXISTS {TRIGGER} ON {target};
CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE ON {target}
    FOR EACH STATEMENT EXECUTE FUNCTION {function}('{channel}');
COMMIT;
"""
