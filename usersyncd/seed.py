"""The seeded users table: how it is made, and what the API should hold for it.

The demo, the tests and the benchmarks share it, so "in sync" means one thing in all of them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import asyncpg

from usersyncd import db, records

FIELDS = {"email": "email", "name": "name", "time_zone": "time_zone"}  # the seed's mapping, the default

SOURCE_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    id          bigint PRIMARY KEY,
    email       text,
    name        text,
    time_zone   text,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (updated_at, id);
"""


async def seed_users(
    connection: asyncpg.Connection,
    count: int,
    *,
    table: str = "users",
    start_id: int = 1,
    invalid_email_every: int = 0,
    invalid_time_zone_every: int = 0,
    updated_at: str = "clock_timestamp() - interval '1 day'",
) -> None:
    """Create a users table if needed and add `count` users in one statement. Every
    `invalid_email_every`-th user has a malformed email and every `invalid_time_zone_every`-th
    an unknown zone (0: none)."""
    quoted = db.quote_ident(table)
    await connection.execute(SOURCE_DDL.format(table=quoted, index=db.quote_ident(f"{table}_updated_at_id")))
    bad_email = f"i % {int(invalid_email_every)} = 0" if invalid_email_every else "false"
    bad_zone = f"i % {int(invalid_time_zone_every)} = 0" if invalid_time_zone_every else "false"
    await connection.execute(
        f"""
        INSERT INTO {quoted} (id, email, name, time_zone, updated_at)
        SELECT i,
               CASE WHEN {bad_email} THEN 'not-an-email-' || i ELSE 'user' || i || '@example.com' END,
               'User ' || i,
               CASE WHEN {bad_zone} THEN 'Mars/Olympus_Mons'
                    ELSE (ARRAY['UTC', 'Europe/Paris', 'America/New_York', 'Asia/Tokyo'])[1 + i % 4]
               END,
               {updated_at}
        FROM generate_series($1::bigint, $2::bigint) AS i
        """,
        start_id,
        start_id + count - 1,
    )


async def expected_state(conn: asyncpg.Connection) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """What the API should hold for each valid user of the seeded table (by email), and the ids
    of the invalid ones (never sent: dead-lettered)."""
    valid: dict[str, dict[str, Any]] = {}
    invalid: set[str] = set()
    for row in await conn.fetch("SELECT id::text AS id, email, name, time_zone FROM users"):
        result = validate(row)
        if isinstance(result, records.Invalid):
            invalid.add(row["id"])
        else:
            valid[result["email"]] = result
    return valid, invalid


def validate(row: Mapping[str, Any]) -> dict[str, Any] | records.Invalid:
    """A seeded row's payload, or why it cannot be sent."""
    return _validate(str(row["id"]), row["email"], row["name"], row["time_zone"])


@functools.cache
def _validate(
    user_id: str, email: str | None, name: str | None, time_zone: str | None
) -> dict[str, Any] | records.Invalid:
    """records.validate, remembered: a test that compares 100,000 rows on every poll would
    otherwise keep a core busy that the daemon needs."""
    row = {"id": user_id, "email": email, "name": name, "time_zone": time_zone}
    return records.validate(user_id, row, FIELDS)


def mismatches(
    state: Mapping[str, dict[str, Any]], valid: Mapping[str, dict[str, Any]], *, drip: bool = False
) -> dict[str, tuple[dict[str, Any] | None, dict[str, Any]]]:
    """The users whose subscriber differs from what their row says, by email: (held, wanted).
    Drip's subscribers also carry their status, "active" for every user in the table."""
    wrong = {}
    for email, want in valid.items():
        wanted = {**want, "status": "active"} if drip else want
        held = state.get(email)
        if held != wanted:
            wrong[email] = (held, wanted)
    return wrong
