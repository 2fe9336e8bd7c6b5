"""A TCP proxy in front of the test PostgreSQL: it counts the statements clients run, and it can
cut the database off (every connection dropped, new ones refused) and bring it back.

`PgProxy(database_url).url` is the same database through the proxy (sslmode=disable, so the
proxy can read the protocol). Statements are the client's Query and Execute messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit


class PgProxy:
    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        query = parse_qs(parts.query)
        self._socket_dir = query.pop("host", [None])[0]
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 5432
        self._parts = parts
        self._query = {k: v[0] for k, v in query.items()}
        self.statements = 0  # Query + Execute messages from clients
        self.executed: list[str] = []  # the SQL text of each, in order
        self.connections = 0  # accepted while up
        self.down = False
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.url = ""

    async def start(self) -> PgProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        userinfo = self._parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        query = urlencode({**self._query, "sslmode": "disable"})
        self.url = urlunsplit((self._parts.scheme, netloc, self._parts.path, query, ""))
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """The database is gone: open connections drop, new ones are closed at once."""
        self.down = True
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    def restore(self) -> None:
        self.down = False

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._socket_dir:
            return await asyncio.open_unix_connection(f"{self._socket_dir}/.s.PGSQL.{self._port}")
        return await asyncio.open_connection(self._host, self._port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        self.connections += 1
        try:
            up_reader, up_writer = await self._upstream()
        except OSError:
            writer.transport.abort()
            return
        self._open.update((writer, up_writer))
        pipes = {
            asyncio.ensure_future(self._client_to_server(reader, up_writer)),
            asyncio.ensure_future(_pipe(up_reader, writer)),
        }
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)  # a dropped connection ends here
            for w in (writer, up_writer):
                self._open.discard(w)
                w.transport.abort()

    async def _client_to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # the startup message has no type byte; every later one is type + length
        length = struct.unpack("!I", await reader.readexactly(4))[0]
        writer.write(struct.pack("!I", length) + await reader.readexactly(length - 4))
        prepared: dict[bytes, str] = {}  # statement name -> SQL (Parse)
        bound = ""  # the SQL of the portal an Execute runs (Bind)
        while True:
            head = await reader.readexactly(5)
            kind, length = head[:1], struct.unpack("!I", head[1:])[0]
            body = await reader.readexactly(length - 4)
            if kind == b"P":
                name, sql = body.split(b"\0")[:2]
                prepared[name] = sql.decode(errors="replace")
            elif kind == b"B":
                bound = prepared.get(body.split(b"\0")[1], "")
            elif kind in (b"Q", b"E"):
                self.statements += 1
                self.executed.append(body.split(b"\0")[0].decode(errors="replace") if kind == b"Q" else bound)
            writer.write(head + body)
            await writer.drain()

    def count(self, fragment: str, since: int = 0) -> int:
        """Statements run (from the `since`-th on) whose SQL contains `fragment`."""
        return sum(fragment in sql for sql in self.executed[since:])


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()
