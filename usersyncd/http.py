"""Health and metrics endpoint (SPEC §8): /healthz (liveness), /readyz (readiness), /metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import http_exceptions, web
from loguru import logger

from usersyncd.metrics import CONTENT_TYPE, READY_TIMEOUT, Metrics


class _MalformedRequestsAtDebug(logging.Filter):
    """aiohttp logs each request it cannot parse at ERROR, with the client's bytes: a scanner or a
    confused probe would flood the journal. Those become DEBUG; our own handlers' errors stay ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, http_exceptions.HttpProcessingError):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_server_logger = logging.getLogger("usersyncd.http.server")
_server_logger.addFilter(_MalformedRequestsAtDebug())


class HealthServer:
    """`ready()` says why the daemon is not ready (None: it is); `refresh()` updates the gauges."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        ready: Callable[[], Awaitable[str | None]],
        refresh: Callable[[], Awaitable[None]],
    ) -> None:
        self.metrics = metrics
        self._ready = ready
        self._refresh = refresh
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, logger=_server_logger)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # aiohttp exposes the bound port only here
        self.port = server.sockets[0].getsockname()[1] if server and server.sockets else port
        logger.bind(listen=f"{host}:{self.port}").info("health and metrics endpoint listening")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        try:
            reason = await asyncio.wait_for(self._ready(), READY_TIMEOUT)
        except Exception as exc:  # the database did not answer: not ready, never a 500
            reason = f"database unreachable: {type(exc).__name__}"
        if reason is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {reason}\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        try:
            # refresh() bounds its own wait; this only guards against a hang
            await asyncio.wait_for(self._refresh(), READY_TIMEOUT + 1.0)
        except Exception:  # serve the counters anyway; the gauges say the database is down
            self.metrics.up.set(0)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
