"""Reading a batch's rows so that one value the driver cannot decode costs only its own user (G14).

A `date` before year 1 (`ValueError` in asyncpg's codec) or bytes invalid in the database
encoding (`CharacterNotInRepertoireError` from the server) fail the whole statement. The batch
is then read again in halves, down to single rows; a row still unreadable alone is reported
with the first mapped column that fails on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from usersyncd import db
from usersyncd.source import Row, Source


@dataclass(frozen=True)
class Unreadable:
    """A user whose row cannot be read: the API field at fault (if one column is) and why."""

    user_id: str
    field: str | None
    reason: str


def is_data_error(exc: BaseException) -> bool:
    """An error the data of some rows causes, not the connection or the SQL: reading fewer
    rows can succeed."""
    if isinstance(exc, db.CONNECTION_ERRORS):
        return False
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, asyncpg.DataError)  # SQLSTATE class 22
    return isinstance(exc, ValueError | OverflowError | UnicodeError | TypeError)


async def fetch(
    conn: asyncpg.Connection, source: Source, user_ids: Sequence[str]
) -> tuple[dict[str, Row], list[Unreadable]]:
    """The users' current rows by id, and those that cannot be read."""
    try:
        return await source.fetch(conn, user_ids), []
    except Exception as exc:
        if not is_data_error(exc):
            raise
        if len(user_ids) == 1:
            return {}, [await _diagnose(conn, source, user_ids[0], exc)]
    half = len(user_ids) // 2
    rows, bad = await fetch(conn, source, user_ids[:half])
    more_rows, more_bad = await fetch(conn, source, user_ids[half:])
    return rows | more_rows, bad + more_bad


async def _diagnose(conn: asyncpg.Connection, source: Source, user_id: str, exc: Exception) -> Unreadable:
    """Name the first mapped column that cannot be read alone (None if each one can)."""
    uid = db.quote_ident(source.config.id_column)
    for api_field, column in source.config.fields.items():
        sql = (
            f"SELECT {db.quote_ident(column)} FROM {source.table}"
            f" WHERE {uid} = $1::text::{source.id_type} AND {source.where_filter}"
        )
        try:
            await conn.fetchval(sql, user_id)
        except Exception as column_exc:
            if not is_data_error(column_exc):
                raise
            return Unreadable(
                user_id, api_field, f"cannot read column {column!r}: {describe(column_exc, 300)}"
            )
    return Unreadable(user_id, None, f"cannot read the row: {describe(exc, 300)}")


def describe(exc: BaseException, limit: int | None = None) -> str:
    """An exception as one line: its type and its message (cut to `limit` characters)."""
    text = " ".join(str(exc).split())[:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
