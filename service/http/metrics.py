"""GET /metrics: the server's Prometheus registry in the text exposition format."""

from __future__ import annotations

from aiohttp import web

from service.metrics import CONTENT_TYPE_LATEST, Metrics


def metrics_routes(metrics: Metrics) -> list[web.RouteDef]:
    async def serve_metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=metrics.exposition())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    return [web.get("/metrics", serve_metrics)]
