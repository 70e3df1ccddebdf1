"""One aiohttp listener in the server's event loop, built to take routes from several modules.

A module that serves something over HTTP adds its routes before `start` (`listener.add_routes([...])`, aiohttp
RouteDefs); GET /metrics is one of them (service/http/metrics.py). Once bound it logs exactly
`http listening on HOST:PORT` (bench/server_process.py reads the port from that line).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable

from aiohttp import web

log = logging.getLogger(__name__)


class HttpListener:
    """An aiohttp application and its one TCP site; TLS when given an ssl context."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 client_max_size: int = 4 * 1024 * 1024):
        self.host = host
        self.requested_port = port
        self.ssl_context = ssl_context
        self.app = web.Application(client_max_size=client_max_size)
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        """Add routes; only before `start` (aiohttp freezes the router then)."""
        self.app.add_routes(list(routes))

    async def start(self) -> int:
        """Bind and serve; returns the port (the one picked when asked for 0)."""
        # handler_cancellation: a client that disconnects cancels its handler, so its request leaves the engine.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]  # (host, port, ...) of the bound socket
        log.info("http listening on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def server_ssl_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """TLS for the listener from the gRPC server's PEM files; with a client CA, clients need its certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
