"""Everything that reads the users table: checking it, the keyset scan, fetching rows by id.

Every identifier comes from the config and is quoted; `source.filter` is the operator's own
SQL predicate, inserted as written (SPEC G9). usersyncd only ever SELECTs here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg

from usersyncd import db
from usersyncd.config import SourceConfig
from usersyncd.errors import SourceError

TIMESTAMP_TYPES = ("timestamp with time zone", "timestamp without time zone")

# The version of a row whose updated_at is NULL: '-infinity'. Never None, so that a deleted row
# (no version) still differs from a NULL one.
NULL_VERSION = "-infinity"


# Which rows p (user_id, updated_at, passes) of a scan are staged, against their sync_state row s:
# a version not seen yet, or a row that passes again; a known user's row that fails the filter
# (never an unknown one's: nothing to send for it), unless seen so already.
STAGED = """CASE WHEN p.passes
                THEN s.user_id IS NULL OR s.seen_updated_at IS DISTINCT FROM p.updated_at OR s.gone
                ELSE s.user_id IS NOT NULL
                     AND (s.seen_updated_at IS DISTINCT FROM p.updated_at OR NOT s.gone) END"""


@dataclass(frozen=True)
class Source:
    """The users table as found in the catalog, with the SQL to read it."""

    config: SourceConfig
    id_type: str  # format_type() of the id column, e.g. "bigint", "uuid"
    has_keyset_index: bool

    @property
    def table(self) -> str:
        return db.qualified(*self.config.table_parts)

    @property
    def where_filter(self) -> str:
        return f"({self.config.filter})" if self.config.filter.strip() else "true"

    @property
    def version_sql(self) -> str:
        """A row's version: its updated_at as PostgreSQL writes a timestamptz, '-infinity' when NULL
        (never NULL: see NULL_VERSION). Text: compared for equality and written back into a
        timestamptz by the same server (`queue.mark_sent`), so it is exact, and reading it costs a
        fifth of a datetime (0.15 µs a row, twice per user sent)."""
        return f"coalesce({db.quote_ident(self.config.updated_at_column)}::timestamptz, '-infinity')::text"

    @property
    def columns(self) -> list[str]:
        """The distinct columns the mapped fields read, in mapping order."""
        return list(dict.fromkeys(self.config.fields.values()))

    def stage_page_sql(self, state_schema: str, *, scan: str, has_cursor_id: bool) -> str:
        """One page of a keyset scan, staged into sync_state in the same statement.

        `scan` is "live", "backfill" or "nulls". Parameters:
        live      $1 start updated_at, $2 start id (text; NULL without has_cursor_id), $3 page
                  size, $4 lane (live, or paced for a wave), $5 how many more the live lane
                  may take in: a page with more new versions goes to the paced lane (a wave
                  committed late, behind the bound, must not fill the live lane); $6, $7 the
                  last key when the poll counted (`fresh_count_sql`): the poll stages no row
                  after it, those are the next poll's, counted afresh;
        backfill  the same, then $5 the first start (exclusive upper bound on updated_at) and
                  $6 lookback: a row stamped less than `lookback` before the statement may
                  still be committed late, so the walk waits for it (`whole`: it did not wait);
        nulls     $1 start id, $2 page size, $3 lane: rows whose updated_at is NULL, by id.
        A row whose version (updated_at; '-infinity' for NULL) sync_state has already seen is
        left alone: re-reading the lookback writes and locks nothing. The live scan also reads
        rows that fail `source.filter`: a user sync_state knows whose row was updated out of the
        filter is staged `gone` at once (G12), and one whose row passes again is no longer gone.
        Returns rows read, users staged (and of them in the live lane), the last key of the
        page, and for the backfill whether it did not wait for late commits (`whole`)."""
        upd = db.quote_ident(self.config.updated_at_column)
        uid = db.quote_ident(self.config.id_column)
        state = db.quote_ident(state_schema)
        whole = "true"
        # the live scan reads every changed row and tells those that pass the filter
        passes, where_filter = ("true", self.where_filter)
        if scan == "live":
            passes, where_filter = (f"{self.where_filter} IS TRUE", "true")
        if scan == "nulls":
            start = f"{uid} > $1::text::{self.id_type}" if has_cursor_id else "$1::text IS NULL"
            where, version, limit, lane = f"{upd} IS NULL AND {start}", "'-infinity'", "$2", "$3"
        else:
            where = (
                f"({upd}, {uid}) > ($1::timestamptz, $2::text::{self.id_type})"
                if has_cursor_id
                else f"{upd} >= $1::timestamptz AND $2::text IS NULL"
            )
            if scan == "backfill":
                # the statement's snapshot is taken after statement_timestamp(): rows stamped
                # before the bound and committed within lookback are visible to it
                bound = "least($5::timestamptz, statement_timestamp() - make_interval(secs => $6))"
                where += f" AND {upd} < {bound}"
                whole = f"{bound} >= $5::timestamptz"
            version, limit, lane = f"{upd}", "$3", "$4"
            if scan == "live":
                where += f" AND ({upd}, {uid}) <= ($6::timestamptz, $7::text::{self.id_type})"
                lane = "CASE WHEN $4 = 0 AND (SELECT count(*) FROM fresh) > $5 THEN 1 ELSE $4 END"
        if scan == "backfill":
            # each row once, and none the other scans stage (older than the first start, not
            # NULL, read whether it passes or not only by the live scan): ON CONFLICT's own
            # check is enough (it is STAGED's for a row that passes), the probe below was a
            # third of a page
            fresh = "SELECT user_id, updated_at, NOT passes AS gone FROM page"
        else:
            # rows already seen (the live lane's lookback, the sweep's rounds) write and lock
            # nothing: one index probe per row read (LATERAL ... LIMIT 1), whatever the planner
            # thinks of sync_state (a plan cached while it was small hashed all of it per page)
            fresh = f"""
                SELECT p.user_id, p.updated_at, NOT p.passes AS gone
                FROM page AS p LEFT JOIN LATERAL (
                    SELECT s.user_id, s.seen_updated_at, s.gone FROM {state}.sync_state AS s
                    WHERE s.user_id = p.user_id LIMIT 1
                ) AS s ON true
                WHERE {STAGED}"""
        return f"""
            WITH page AS (
                SELECT {uid}::text AS user_id, {version}::timestamptz AS updated_at, {passes} AS passes
                FROM {self.table}
                WHERE {where} AND {where_filter}
                ORDER BY {self.table}.{upd}, {self.table}.{uid}  -- the columns (the index's order), not the casts
                LIMIT {limit}
            ), fresh AS ({fresh}
            ), staged AS (
                INSERT INTO {state}.sync_state AS s (user_id, seen_updated_at, dirty, lane, stage_seq, gone)
                SELECT user_id, updated_at, true, {lane}, 1, gone FROM fresh
                ORDER BY user_id  -- every writer of sync_state locks rows in user_id order
                ON CONFLICT (user_id) DO UPDATE
                    SET seen_updated_at = excluded.seen_updated_at,
                        gone = excluded.gone,
                        dirty = true,
                        stage_seq = s.stage_seq + 1,
                        -- a user already waiting keeps the faster lane; one sent before takes the new one
                        lane = CASE WHEN s.dirty THEN least(s.lane, excluded.lane) ELSE excluded.lane END,
                        dirty_since = CASE WHEN s.dirty THEN s.dirty_since
                                           ELSE clock_timestamp() END
                    -- a version not seen yet (newer, or older: updated_at can move backwards), or
                    -- a row that left or came back
                    WHERE s.seen_updated_at IS DISTINCT FROM excluded.seen_updated_at
                       OR s.gone IS DISTINCT FROM excluded.gone
                RETURNING s.lane
            ), counted AS (
                SELECT count(*) AS read FROM page
            )
            SELECT counted.read,
                   (SELECT count(*) FROM staged) AS staged,
                   (SELECT count(*) FROM staged WHERE lane = 0) AS live_staged,
                   last.updated_at AS last_updated_at, last.user_id AS last_id,
                   {whole} AS whole
            FROM counted
            -- the page's last row, in the order it was read (a row_number() over the page and a
            -- sort on it cost a seventh of the statement)
            LEFT JOIN LATERAL (
                SELECT updated_at, user_id FROM page OFFSET greatest(counted.read - 1, 0) LIMIT 1
            ) AS last ON true
        """

    def fresh_count_sql(self, state_schema: str) -> str:
        """How many rows the live scan will stage from $1, counted up to $2 (to tell a wave from
        single changes before staging any): rows updated out of the filter count too, so a bulk
        soft-delete is a wave as a bulk update is (G11). When there are some, also the last key
        (updated_at, id as text) of the same snapshot, which bounds the poll's pages: a change
        committed while a wave is being staged is not swept into it, the next poll counts it
        apart (found by CI: a single change waited behind a wave still staging). An idle poll
        does not read the key (an initplan runs when first needed): one index probe. And when
        the statement began: every row committed before then is at or before the key."""
        upd = db.quote_ident(self.config.updated_at_column)
        uid = db.quote_ident(self.config.id_column)
        state = db.quote_ident(state_schema)
        return f"""
            WITH counted AS (
                SELECT count(*) AS fresh FROM (
                    SELECT 1 FROM (
                        SELECT {uid}::text AS user_id, {upd}::timestamptz AS updated_at,
                               {self.where_filter} IS TRUE AS passes
                        FROM {self.table}
                        WHERE {upd} >= $1::timestamptz
                    ) AS p
                    LEFT JOIN {state}.sync_state AS s ON s.user_id = p.user_id
                    WHERE {STAGED}
                    LIMIT $2
                ) AS fresh
            ), bound AS (
                SELECT {upd}::timestamptz AS until_at, {uid}::text AS until_id FROM {self.table}
                WHERE {upd} IS NOT NULL
                ORDER BY {self.table}.{upd} DESC, {self.table}.{uid} DESC
                LIMIT 1
            )
            SELECT fresh,
                   CASE WHEN fresh > 0 THEN (SELECT until_at FROM bound) END AS until_at,
                   CASE WHEN fresh > 0 THEN (SELECT until_id FROM bound) END AS until_id,
                   statement_timestamp() AS counted_at
            FROM counted
        """

    def reconcile_sql(self, state_schema: str, *, has_cursor_id: bool) -> str:
        """One chunk of the reconciliation pass (G12): the next $2 users of sync_state after $1
        (by user_id, its primary key), and of them those the API holds subscribed (an accepted
        email, not unsubscribed, not waiting: a waiting user's row is read anyway) with no row
        that passes the filter (an anti-join by the source's id) are marked `gone`, dirty with
        $3 (on_delete = "unsubscribe": they wait, paced, for an unsubscribe batch). With $3
        false a user already gone is left alone. Returns users checked, the last one, users found."""
        state = db.quote_ident(state_schema)
        after = "user_id > $1::text" if has_cursor_id else "$1::text IS NULL"
        return f"""
            WITH chunk AS (
                SELECT user_id, dirty, batch_id, gone, sent_email, unsubscribed_at
                FROM {state}.sync_state WHERE {after} ORDER BY user_id LIMIT $2
            ), missing AS (
                SELECT c.user_id AS "__usersyncd_id" FROM chunk AS c
                WHERE c.sent_email IS NOT NULL AND c.unsubscribed_at IS NULL
                  AND NOT c.dirty AND c.batch_id IS NULL AND (NOT c.gone OR $3::boolean)
                  AND {self._no_row("c")}
            ), locked AS (
                SELECT s.user_id FROM {state}.sync_state AS s
                WHERE s.user_id IN (SELECT "__usersyncd_id" FROM missing)
                ORDER BY s.user_id  -- every writer of sync_state locks rows in user_id order
                FOR UPDATE
            ), marked AS (
                UPDATE {state}.sync_state AS s
                SET gone = true,
                    dirty = $3::boolean,
                    stage_seq = s.stage_seq + 1,
                    -- paced: a deletion found late waits behind live changes (G11)
                    lane = CASE WHEN $3::boolean THEN 1 ELSE s.lane END,
                    dirty_since = CASE WHEN $3::boolean THEN clock_timestamp() ELSE s.dirty_since END
                FROM locked
                -- rechecked on the locked row: staged or taken into a batch since, it is read anyway
                WHERE s.user_id = locked.user_id AND NOT s.dirty AND s.batch_id IS NULL
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM chunk) AS checked,
                   (SELECT user_id FROM chunk ORDER BY user_id DESC LIMIT 1) AS last_id,
                   (SELECT count(*) FROM marked) AS found
        """

    def _no_row(self, state_alias: str) -> str:
        """No row of the source passes the filter for the sync_state user `state_alias`."""
        uid = db.quote_ident(self.config.id_column)
        return f"""NOT EXISTS (
                      SELECT 1 FROM {self.table}
                      WHERE {self.table}.{uid} = {state_alias}.user_id::{self.id_type} AND {self.where_filter}
                  )"""

    def held_gone_count_sql(self, state_schema: str) -> str:
        """Users the API holds subscribed (an accepted email, not unsubscribed) with no row that
        passes the filter, found by the reconciliation pass or not yet (for `run --dry-run`)."""
        state = db.quote_ident(state_schema)
        return f"""
            SELECT count(*) FROM {state}.sync_state AS c
            WHERE c.sent_email IS NOT NULL AND c.unsubscribed_at IS NULL AND {self._no_row("c")}
        """

    def null_count_sql(self) -> str:
        """Rows that pass the filter and have a NULL updated_at (for `check`)."""
        upd = db.quote_ident(self.config.updated_at_column)
        return f"SELECT count(*) FROM {self.table} WHERE {upd} IS NULL AND {self.where_filter}"

    def fetch_sql(self) -> str:
        """Current rows of the given ids ($1: a text[] literal, `db.text_array`) that pass the filter."""
        uid = db.quote_ident(self.config.id_column)
        cols = ", ".join(db.quote_ident(c) for c in self.columns)
        return f"""
            SELECT {uid}::text AS "__usersyncd_id", {self.version_sql} AS "__usersyncd_updated_at", {cols}
            FROM {self.table}
            WHERE {uid} = ANY($1::text::text[]::{self.id_type}[]) AND {self.where_filter}
        """

    async def versions(self, conn: asyncpg.Connection, user_ids: Sequence[str]) -> dict[str, str]:
        """The users' current version (updated_at, NULL_VERSION for NULL), by id: a cheap check
        before sending a formed batch. A missing id is a deleted or filtered-out row."""
        uid = db.quote_ident(self.config.id_column)
        records = await conn.fetch(
            f"SELECT {uid}::text AS id, {self.version_sql} AS updated_at FROM {self.table}"
            f" WHERE {uid} = ANY($1::text::text[]::{self.id_type}[]) AND {self.where_filter}",
            db.text_array(user_ids),
        )
        return {r["id"]: r["updated_at"] for r in records}

    async def fetch(self, conn: asyncpg.Connection, user_ids: Sequence[str]) -> dict[str, Row]:
        """The users' rows as they are now, by id (missing: deleted or filtered out)."""
        # Any: the record itself is the column -> value mapping (no dict built per row, and no
        # cast() per row either: its Mapping[str, Any] alone costs 0.14 µs each time)
        records: list[Any] = await conn.fetch(self.fetch_sql(), db.text_array(user_ids))
        return {r[0]: Row(r[0], r[1], r) for r in records}


class Row(NamedTuple):  # a tuple: made once per user read, ~4x cheaper than a frozen dataclass
    user_id: str
    updated_at: str  # the version (`Source.version_sql`): NULL_VERSION when the column is NULL
    values: Mapping[str, Any]  # column -> value (an asyncpg Record: indexed by column name)


async def inspect(conn: asyncpg.Connection, config: SourceConfig) -> Source:
    """Find the table and columns in the catalog; a clear SourceError when something is missing."""
    schema, table = config.table_parts
    relid = await conn.fetchval(
        """
        SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
        """,
        schema,
        table,
    )
    if relid is None:
        raise SourceError(f"source.table: table {schema}.{table} does not exist (or is not visible)")
    rows = {
        r["attname"]: r
        for r in await conn.fetch(
            "SELECT attname, format_type(atttypid, atttypmod) AS type,"
            " format_type(atttypid, NULL) AS base_type FROM pg_attribute"
            " WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped",
            relid,
        )
    }
    columns = {name: r["type"] for name, r in rows.items()}
    wanted = {
        "source.id_column": config.id_column,
        "source.updated_at_column": config.updated_at_column,
    }
    wanted |= {f"source.fields.{api}": column for api, column in config.fields.items()}
    for key, column in wanted.items():
        if column not in columns:
            raise SourceError(f"{key}: column {column!r} does not exist in {schema}.{table}")
    if rows[config.updated_at_column]["base_type"] not in TIMESTAMP_TYPES:  # timestamp(6) too
        raise SourceError(
            f"source.updated_at_column: {config.updated_at_column!r} is "
            f"{columns[config.updated_at_column]}, not a timestamp"
        )
    if config.filter.strip():
        try:
            await conn.fetchval(
                f"SELECT count(*) FROM (SELECT 1 FROM {db.qualified(schema, table)} WHERE ({config.filter}) LIMIT 1) AS probe"
            )
        except asyncpg.PostgresError as exc:
            raise SourceError(f"source.filter: {exc}") from None
    has_index = await conn.fetchval(
        """
        SELECT EXISTS (
            SELECT 1 FROM pg_index i
            WHERE i.indrelid = $1
              AND (SELECT attname FROM pg_attribute WHERE attrelid = $1 AND attnum = i.indkey[0]) = $2
              AND (SELECT attname FROM pg_attribute WHERE attrelid = $1 AND attnum = i.indkey[1]) = $3
        )
        """,
        relid,
        config.updated_at_column,
        config.id_column,
    )
    return Source(config=config, id_type=columns[config.id_column], has_keyset_index=bool(has_index))
