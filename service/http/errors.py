"""The error an HTTP API handler raises, and the HTTP status of each of the request path's failures."""

from __future__ import annotations

import math

from service.frontend import Failure, RequestFailed

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
