"""What every HTTP API request passes before its handler sees it: the bearer token, then a JSON body that
arrives within the time limit and fits the size limit. /metrics and /health are not guarded."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass

from aiohttp import web

from service.core.auth import bearer_matches
from service.failures import Failure, RequestFailed
from service.http.fields import invalid

REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 128


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


@dataclass(frozen=True)
class Guard:
    token: str  # "" for none
    body_timeout: float  # seconds
    max_body_bytes: int

    def check_token(self, request: web.Request) -> None:
        if self.token and not bearer_matches(request.headers.get("Authorization"), self.token):
            raise RequestFailed(Failure.UNAUTHENTICATED, "missing or invalid bearer token (header `Authorization: "
                                "Bearer <token>`)", field="authorization")

    async def json_body(self, request: web.Request) -> object:
        """The token checked, then the body parsed as JSON. 401, 408 (too slow), 413 (too big) or 400."""
        self.check_token(request)
        try:
            body = await asyncio.wait_for(request.read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise RequestFailed(Failure.BODY_TIMEOUT, f"not received within {self.body_timeout:g} s",
                                field="body") from None
        except web.HTTPRequestEntityTooLarge:
            raise RequestFailed(Failure.TOO_LARGE, f"larger than the limit of {self.max_body_bytes} bytes",
                                field="body") from None
        try:
            return json.loads(body, parse_constant=_refuse_constant)
        except RecursionError:
            raise invalid("body", "JSON nested too deeply") from None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
            raise invalid("body", f"not valid JSON: {err}") from None


def request_id(request: web.Request, prefix: str = "", *, default: str = "") -> str:
    """The caller's X-Request-Id when it is short and printable, else `default`, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    if given and len(given) <= MAX_REQUEST_ID and given.isprintable():
        return given
    return default or f"{prefix}-{uuid.uuid4().hex}"
