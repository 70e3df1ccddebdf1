"""GET /health: 200 while the server is ready (grpc.health.v1 SERVING for chat.v1.ChatService), 503 otherwise.
Open without a token, like gRPC health, for load balancers and orchestrators."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web


def health_routes(ready: Callable[[], Awaitable[bool]]) -> list[web.RouteDef]:
    async def health(_request: web.Request) -> web.Response:
        if await ready():
            return web.json_response({"status": "SERVING"})
        return web.json_response({"status": "NOT_SERVING"}, status=503)

    return [web.get("/health", health)]
