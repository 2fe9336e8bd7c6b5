"""Which pipeline a state schema belongs to (SPEC §3, "Planned after these").

`sync_state` and `cursors` are not keyed by pipeline: two configs on one schema would share
them, and the second would take the first one's users. The first `run` records its pipeline;
every start (and every operator command that acts on the state) compares and refuses another.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from usersyncd import db
from usersyncd.config import Config
from usersyncd.errors import ConfigError


@dataclass(frozen=True)
class Pipeline:
    name: str  # queue.name
    source: str  # schema.table
    api: str  # where batches go, without credentials

    @classmethod
    def of(cls, config: Config) -> Pipeline:
        schema, table = config.source.table_parts
        url = urlsplit(config.api.url)
        host = url.netloc.rpartition("@")[2].lower()  # userinfo is a secret, never recorded
        base = urlunsplit((url.scheme.lower(), host, url.path.rstrip("/"), "", ""))
        return cls(config.queue.name, f"{schema}.{table}", base + config.api.batch_path)

    def __str__(self) -> str:
        return f'"{self.name}" ({self.source} -> {self.api})'


async def claim(conn: asyncpg.Connection, config: Config, *, record: bool = True) -> None:
    """Refuse (ConfigError: one line, exit 2) when the schema belongs to another pipeline;
    with `record`, the schema is this pipeline's from now on if nobody owns it yet."""
    schema = config.database.state_schema
    sql = db.queries("pipeline", schema)
    mine = Pipeline.of(config)
    async with conn.transaction():
        if record:
            await conn.execute(sql["lock"])
        owners = [Pipeline(r["name"], r["source"], r["api"]) for r in await conn.fetch(sql["recorded"])]
        for other in owners:
            if other != mine:
                raise ConfigError(_refusal(schema, other, mine))
        if record and not owners:
            await conn.execute(sql["record"], mine.name, mine.source, mine.api)


def _refusal(schema: str, owner: Pipeline, mine: Pipeline) -> str:
    keys = [
        key
        for key, differs in (
            ("queue.name", owner.name != mine.name),
            ("source.table", owner.source != mine.source),
            ("api.url/batch_path", owner.api != mine.api),
        )
        if differs
    ]
    return (
        f"{', '.join(keys)}: state schema {schema!r} belongs to pipeline {owner}, not to this config's"
        f" {mine}; give this pipeline its own database.state_schema"
        f" (if this config replaces that pipeline: DELETE FROM {db.quote_ident(schema)}.pipelines)"
    )
