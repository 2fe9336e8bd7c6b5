"""`usersyncd check`: the config, the database, the source table, and (on request) the API."""

from __future__ import annotations

import asyncpg

from usersyncd import api, db, notify, source
from usersyncd.config import Config
from usersyncd.errors import UserSyncError
from usersyncd.quota import Quota


async def check(config: Config, *, probe_api: bool = False, spend_slot: bool = False) -> int:
    """Print one line per check; 0 when everything passed, 1 otherwise."""
    problems = 0

    def report(ok: bool, what: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {what}")

    report(True, "config is valid")
    try:
        pool = await db.create_pool(config.database.url, min_size=1, max_size=2)
    except UserSyncError as exc:
        report(False, str(exc))
        return 1
    try:
        async with pool.acquire() as conn:
            report(True, f"database reachable: {db.redact_dsn(config.database.url)}")
            await _check_source(conn, config, report)
            version = await db.schema_version(conn, config.database.state_schema)
            if version is None:
                print(f"note state schema {config.database.state_schema!r} not created yet (run creates it)")
            else:
                report(True, f"state schema {config.database.state_schema!r} at version {version}")
        if probe_api:
            await _probe_api(pool, config, report, spend_slot=spend_slot)
    finally:
        await pool.close()
    return 0 if problems == 0 else 1


async def _check_source(conn: asyncpg.Connection, config: Config, report) -> None:  # type: ignore[no-untyped-def]
    try:
        src = await source.inspect(conn, config.source)
    except UserSyncError as exc:
        report(False, str(exc))
        return
    report(True, f"source table {config.source.table} with columns {', '.join(src.columns)}")
    report(
        src.has_keyset_index,
        f"index on ({config.source.updated_at_column}, {config.source.id_column})"
        + ("" if src.has_keyset_index else " is missing: every poll would scan the whole table"),
    )
    channel = config.source.notify_channel
    if channel:
        installed = await notify.trigger_installed(conn, config.source)
        report(
            installed,
            f"trigger usersyncd_notify on {config.source.table} notifies {channel!r}"
            + (
                ""
                if installed
                else " is missing: changes wait for the next poll; `usersyncd trigger-sql` prints it"
            ),
        )
    nulls = await conn.fetchval(src.null_count_sql())
    column = config.source.updated_at_column
    if not nulls:
        report(True, f"no row has a NULL {column}")
    elif config.source.start_from != "beginning":
        print(f'note {nulls} rows have a NULL {column}: not synced, start_from is not "beginning"')
    else:
        print(
            f"note {nulls} rows have a NULL {column}: each is sent once, found by id;"
            f" a change to one is seen when its {column} is set"
        )


async def _probe_api(pool: asyncpg.Pool, config: Config, report, *, spend_slot: bool) -> None:  # type: ignore[no-untyped-def]
    """GET the probe path (no batch quota spent); without one, an empty batch through the quota
    only when the operator agrees to spend a slot on it."""
    if config.api.probe_path:
        async with api.ExternalUserApi(config.api) as client:
            probe = await client.probe()
        report(probe.ok, f"API {config.api.url}{probe.path}: {probe.meaning}")
        return
    if not spend_slot:
        report(
            False,
            "API not probed: api.probe_path is not set (Drip: /v2/accounts/{account_id}); "
            "--spend-slot sends one empty batch through the quota instead",
        )
        return
    async with pool.acquire() as conn:
        await db.migrate(conn, config.database.state_schema)
    quota = Quota(
        pool,
        config.limits,
        config.database.state_schema,
        worker="check",
        credentials_probe_every=config.retry.backoff,
        request_timeout=config.api.timeout,
    )
    while True:  # as a worker sends: the ledger holds the real start, and the deadline runs from it
        slot = await quota.acquire(kind="probe")
        assert slot is not None
        confirmed = await quota.confirm(slot)
        if confirmed is not None:
            break
        await quota.release(slot)  # a pause began since the grant: wait it out
    async with api.ExternalUserApi(config.api) as client:
        outcome = await client.send([], deadline=confirmed.deadline)
    await quota.record(confirmed, **outcome.ledger_fields())
    where = f"API {config.api.url}{config.api.resolve(config.api.batch_path)} (one slot spent)"
    if outcome.status is None:
        report(False, f"{where}: no answer ({outcome.error}): check api.url")
    elif outcome.status in (400, 422):  # an empty batch is refused by its content: key and path work
        report(
            True, f"{where}: HTTP {outcome.status} to an empty batch, as expected: the key and the path work"
        )
    else:
        report(outcome.kind is api.OutcomeKind.OK, f"{where}: {api.probe_meaning(outcome.status)}")
