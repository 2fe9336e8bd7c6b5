"""The health/metrics endpoint: a request it cannot parse is not an ERROR line (journal flood)."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from usersyncd import log
from usersyncd.http import HealthServer
from usersyncd.metrics import Metrics

GARBAGE = {
    "bad header": b"GET /metrics HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n",
    "bad request line": b"GET /metrics HTTP/9.Z\r\n\r\n",
    "header too long": b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    "after a good request": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01\x00\xa5\x01\r\n\r\n",
    "binary": b"\x00\xff\xfe garbage \r\n\r\n",
}


async def send(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


@pytest.mark.parametrize("name", GARBAGE)
async def test_a_malformed_request_logs_nothing_at_error(name: str) -> None:
    out = io.StringIO()
    log.configure("DEBUG", "json", stream=out)

    async def ready() -> str | None:
        return None

    async def refresh() -> None:
        return None

    server = HealthServer(Metrics(), ready=ready, refresh=refresh)
    await server.start("127.0.0.1", 0)
    try:
        assert server.port is not None
        await send(server.port, GARBAGE[name])
        await asyncio.sleep(0.1)  # aiohttp logs after answering
    finally:
        await server.stop()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    errors = [line for line in lines if line["level"] in ("ERROR", "CRITICAL")]
    assert not errors, errors
