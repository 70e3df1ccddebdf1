"""How the HTTP APIs say a failure: the field under its HTTP name, the headers a status needs, and the boundary
around every API handler that answers each failure, and any bug, in the API's own JSON shape. The status, the
OpenAI error type and code come from the failure's kind (service/failures.py)."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from service.core.frontend import Frontend
from service.failures import Failure, RequestFailed, Status

log = logging.getLogger(__name__)

UNAVAILABLE_RETRY_MS = 1000  # Retry-After for a 503 that names no pause of its own


def http_field(failed: RequestFailed) -> str | None:
    """The field under the name the HTTP APIs use (`params.top_p` is `top_p` there); an empty name (a body's key
    `""`) is still a field."""
    return failed.field.removeprefix("params.") if failed.field is not None else None


def http_message(failed: RequestFailed) -> str:
    """`field: message`, with the field under its HTTP name (the message alone for an empty name, which it
    quotes)."""
    field = http_field(failed)
    return f"{field}: {failed.message}" if field else failed.message


def respond(body: dict, failed: RequestFailed, **json_options) -> web.Response:
    """A JSON error response with the status and headers of `failed`'s kind: WWW-Authenticate on 401,
    Retry-After when a retry should wait, and the connection closed after a body too slow or too big (the rest
    of it is never read)."""
    kind = failed.kind
    headers = {}
    if kind is Failure.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    retry = failed.retry_after_ms
    if retry is None and kind.status is Status.UNAVAILABLE:
        retry = UNAVAILABLE_RETRY_MS
    if retry is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry / 1000)))
    response = web.json_response(body, status=kind.http_status, headers=headers, **json_options)
    if kind in (Failure.BODY_TIMEOUT, Failure.TOO_LARGE):
        response.force_close()
    return response


HANDED_OVER = web.RequestKey("handed_over", bool)  # set on a request once the frontend records it


def handed_over(request: web.Request) -> None:
    """Say that `request` goes to the frontend now, which records and logs it from here on."""
    request[HANDED_OVER] = True


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_boundary(handler: Handler, answer: Callable[[RequestFailed], web.StreamResponse],
                   frontend: Frontend) -> Handler:
    """`handler` with every RequestFailed answered by `answer` (the API's JSON shape), and any other exception,
    which is a bug, logged with its traceback, counted as INTERNAL and answered 500 in that same shape: never
    aiohttp's plain-text "Server got itself in trouble". A request the handler has `handed_over` to the
    frontend is recorded there, once, whatever happens to it; the boundary records only the others (a bug in
    parsing a body, say)."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        try:
            return await handler(request)
        except RequestFailed as failed:
            return answer(failed)
        except (web.HTTPException, ConnectionError):  # aiohttp's own answers; a client gone
            raise
        except Exception as err:
            log.exception("bug in %s %s", request.method, request.path)
            if not request.get(HANDED_OVER, False):
                frontend.record_unanswered("", arrived, Status.INTERNAL)
            return answer(RequestFailed(Failure.INTERNAL, f"internal error (logged by the server): "
                                        f"{type(err).__name__}"))

    return guarded
