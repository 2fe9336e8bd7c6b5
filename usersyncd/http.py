"""Health and metrics endpoint (SPEC §8): /healthz (liveness), /readyz (readiness), /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from loguru import logger

from usersyncd.metrics import CONTENT_TYPE, Metrics

READY_TIMEOUT = 2.0  # seconds for the readiness check's database round trip


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
        self._runner = web.AppRunner(app, access_log=None)
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
            await asyncio.wait_for(self._refresh(), READY_TIMEOUT)
        except Exception:  # serve the counters anyway; the gauges say the database is down
            self.metrics.up.set(0)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
