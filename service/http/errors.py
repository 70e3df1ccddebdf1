"""The error an HTTP API handler raises, the HTTP status of each of the request path's failures, and the boundary
around every API handler that turns both, and any bug, into the API's own JSON error shape."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from service.core.frontend import Failure, Frontend, RequestFailed

log = logging.getLogger(__name__)

FAILURE_STATUS = {
    Failure.INVALID: 400,
    Failure.FULL: 429,
    Failure.OUT_OF_MEMORY: 429,  # RESOURCE_EXHAUSTED, as over gRPC
    Failure.LOADING: 503,
    Failure.DRAINING: 503,
    Failure.ENGINE_UNAVAILABLE: 503,
    Failure.INTERNAL: 500,
}


class HttpError(Exception):
    """A request the HTTP API answers with `status`. `param` is the request field to blame, if any; each API
    shapes the body its own way (api.py: `{"status", "error"}`, openai.py: OpenAI's `{"error": {...}}`)."""

    def __init__(self, status: int, param: str | None, message: str, *, retry_after_ms: int | None = None):
        super().__init__(f"{param}: {message}" if param else message)
        self.status = status
        self.param = param
        self.message = message
        self.retry_after_ms = retry_after_ms

    @property
    def closes_connection(self) -> bool:
        """After a body too slow or too big, the rest of it is not read: the connection closes."""
        return self.status in (408, 413)

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if self.retry_after_ms is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_ms / 1000)))
        return headers


def from_failure(failed: RequestFailed) -> HttpError:
    """The HttpError for a refused or failed request. A validation message, `field: why`, keeps its field
    (`params.top_p` becomes `top_p`, the name the HTTP APIs use)."""
    status = FAILURE_STATUS[failed.kind]
    text = str(failed)
    if failed.kind is Failure.INVALID and ": " in text:
        field, message = text.split(": ", 1)
        return HttpError(status, field.removeprefix("params."), message)
    retry = failed.retry_after_ms
    if retry is None and status == 503:
        retry = 1000
    return HttpError(status, None, text, retry_after_ms=retry)


HANDED_OVER = web.RequestKey("handed_over", bool)  # set on a request once the frontend records it


def handed_over(request: web.Request) -> None:
    """Say that `request` goes to the frontend now, which records and logs it from here on."""
    request[HANDED_OVER] = True


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_boundary(handler: Handler, respond: Callable[[HttpError], web.StreamResponse],
                   frontend: Frontend) -> Handler:
    """`handler` with every HttpError answered by `respond` (the API's JSON shape), and any other exception,
    which is a bug, logged with its traceback, counted as INTERNAL and answered 500 in that same shape: never
    aiohttp's plain-text "Server got itself in trouble". A request the handler has `handed_over` to the
    frontend is recorded there, once, whatever happens to it; the boundary records only the others (a bug in
    parsing a body, say)."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        try:
            return await handler(request)
        except HttpError as error:
            return respond(error)
        except (web.HTTPException, ConnectionError):  # aiohttp's own answers; a client gone
            raise
        except Exception as err:
            log.exception("bug in %s %s", request.method, request.path)
            if not request.get(HANDED_OVER, False):
                frontend.record_unanswered("", arrived, Failure.INTERNAL.code)
            return respond(HttpError(500, None, f"internal error (logged by the server): {type(err).__name__}"))

    return guarded
