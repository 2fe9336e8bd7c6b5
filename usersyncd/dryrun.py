"""`run --dry-run`: read, validate and batch what is pending; log it; send nothing, change nothing.

Everything runs in one READ ONLY transaction, so not even the cursors move.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
from loguru import logger

from usersyncd import db, records, source
from usersyncd.config import Config
from usersyncd.poller import BEGINNING

PAGE = 1000  # rows read per keyset page


@dataclass
class DryRunReport:
    rows_read: int = 0
    to_send: int = 0
    unchanged: int = 0
    invalid: Counter[str] = field(default_factory=Counter)  # API field -> count
    sample: dict[str, Any] | None = None
    null_updated_at: int = 0  # of rows_read: updated_at NULL (G14), read by id
    gone: int = 0  # subscribed at the API, no row passes the filter (G12)
    to_unsubscribe: int = 0  # of them, what on_delete = "unsubscribe" sends

    def batches(self, batch_size: int) -> int:
        return math.ceil(self.to_send / batch_size) + math.ceil(self.to_unsubscribe / batch_size)


async def dry_run(config: Config) -> DryRunReport:
    conn = await asyncpg.connect(config.database.url)
    try:
        async with conn.transaction(readonly=True):
            src = await source.inspect(conn, config.source)
            report = await _scan(conn, config, src)
    finally:
        await conn.close()
    batches = report.batches(config.limits.batch_size)
    windows = max(0, math.ceil(batches / config.limits.requests) - 1)
    logger.bind(
        rows_read=report.rows_read,
        users_to_send=report.to_send,
        unchanged=report.unchanged,
        invalid=dict(report.invalid),
        null_updated_at=report.null_updated_at,
        users_gone=report.gone,
        users_to_unsubscribe=report.to_unsubscribe,
        batches=batches,
        eta_s=round(windows * config.limits.span, 1),
        sample=report.sample,
    ).info("dry run: nothing sent, no state changed")
    return report


async def _scan(conn: asyncpg.Connection, config: Config, src: source.Source) -> DryRunReport:
    schema = db.quote_ident(config.database.state_schema)
    state_exists = await conn.fetchval("SELECT to_regclass($1)", f"{schema}.cursors") is not None
    start = BEGINNING
    if state_exists:
        live = await conn.fetchval(f"SELECT updated_at FROM {schema}.cursors WHERE lane = 'live'")
        backfill_done = await conn.fetchval(f"SELECT done FROM {schema}.cursors WHERE lane = 'backfill'")
        if live is not None and backfill_done:
            start = live - timedelta(seconds=config.source.lookback)
    elif config.source.start_from == "now":
        start = await conn.fetchval("SELECT clock_timestamp()") - timedelta(seconds=config.source.lookback)
    elif config.source.start_moment() is not None:
        start = config.source.start_moment()
    upd, uid = (
        db.quote_ident(config.source.updated_at_column),
        db.quote_ident(config.source.id_column),
    )
    page_sql = f"""
        SELECT {uid}::text AS id, {upd}::timestamptz AS updated_at FROM {src.table}
        WHERE ({upd}, {uid}) > ($1::timestamptz, $2::text::{src.id_type}) AND {src.where_filter}
        ORDER BY {upd}, {uid} LIMIT {PAGE}
    """
    first_sql = page_sql.replace(
        f"({upd}, {uid}) > ($1::timestamptz, $2::text::{src.id_type})",
        f"{upd} >= $1::timestamptz AND $2::text IS NULL",
    )
    nulls_sql = f"""
        SELECT {uid}::text AS id FROM {src.table}
        WHERE {upd} IS NULL AND {uid} > $1::text::{src.id_type} AND {src.where_filter}
        ORDER BY {uid} LIMIT {PAGE}
    """
    first_nulls_sql = nulls_sql.replace(f"{uid} > $1::text::{src.id_type}", "$1::text IS NULL")
    report = DryRunReport()

    async def count(ids: list[str]) -> None:
        current = await src.fetch(conn, ids)
        hashes: dict[str, bytes] = {}
        if state_exists:
            hashes = {
                r["user_id"]: r["sent_hash"]
                for r in await conn.fetch(
                    # an unsubscribed user whose row is back goes again, as "active" (G12)
                    f"SELECT user_id, sent_hash FROM {schema}.sync_state"
                    " WHERE user_id = ANY($1::text[]) AND unsubscribed_at IS NULL",
                    ids,
                )
            }
        for user_id in ids:
            row = current.get(user_id)
            if row is None:
                continue
            report.rows_read += 1
            result = records.validate(user_id, row.values, config.source.fields)
            if isinstance(result, records.Invalid):
                report.invalid[result.field] += 1
            elif hashes.get(user_id) == records.content_hash(result):
                report.unchanged += 1
            else:
                report.to_send += 1
                if report.sample is None:
                    report.sample = records.redacted_sample(result)

    key: tuple[Any, str | None] = (start, None)
    while rows := await conn.fetch(first_sql if key[1] is None else page_sql, *key):
        await count([r["id"] for r in rows])
        key = (rows[-1]["updated_at"], rows[-1]["id"])
    # rows whose updated_at is NULL: no keyset by it reaches them; the daemon's sweep reads them by id
    after: str | None = None
    while rows := await conn.fetch(first_nulls_sql if after is None else nulls_sql, after):
        before = report.rows_read
        await count([r["id"] for r in rows])
        report.null_updated_at += report.rows_read - before
        after = rows[-1]["id"]
    if state_exists:
        report.gone = await conn.fetchval(src.held_gone_count_sql(config.database.state_schema))
        if config.source.on_delete == "unsubscribe":
            report.to_unsubscribe = report.gone
    return report
