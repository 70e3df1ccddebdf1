"""The one failure vocabulary: why a request got no answer, and how each transport says so.

Every layer speaks it: the engine fails a request with a `RequestFailed`, the core refuses one with it, and gRPC,
both HTTP APIs, the metrics and the log line read the same `Failure` member: its canonical status (the gRPC code,
and the `code` label of the metrics), its HTTP status, its OpenAI error type and code, and whether a retry may
help. The field a failure concerns travels as data (`RequestFailed.field`), never inside a message to be parsed
back. Adding a failure kind is one line here.

This module imports nothing of the project, so that every layer, the engine included, may use it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.Enum):
    """How a request ended: the canonical status codes (google.rpc.Code), named as gRPC names them."""

    OK = 0
    CANCELLED = 1
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


@dataclass(frozen=True)
class _Kind:
    meaning: str  # also keeps members with the same codes distinct (equal enum values would be aliases)
    status: Status
    http_status: int
    openai_type: str
    openai_code: str | None
    retryable: bool  # whether asking again (after a pause, or elsewhere) may succeed


class Failure(enum.Enum):
    """Why a request got no answer. `status`, `http_status`, `openai_type`, `openai_code` and `retryable` say
    how each transport reports it."""

    INVALID = _Kind("bad input; the field is named", Status.INVALID_ARGUMENT, 400, "invalid_request_error", None,
                    False)
    FULL = _Kind("more than --max-queued-requests admitted at once", Status.RESOURCE_EXHAUSTED, 429,
                 "rate_limit_error", "rate_limit_exceeded", True)
    OUT_OF_MEMORY = _Kind("a step ran out of memory", Status.RESOURCE_EXHAUSTED, 429, "rate_limit_error",
                          "rate_limit_exceeded", True)
    LOADING = _Kind("the model is still loading", Status.UNAVAILABLE, 503, "server_error", "service_unavailable",
                    True)
    DRAINING = _Kind("the server is shutting down", Status.UNAVAILABLE, 503, "server_error", "service_unavailable",
                     True)
    ENGINE_UNAVAILABLE = _Kind("the engine stopped, or the drain's grace period ran out", Status.UNAVAILABLE, 503,
                               "server_error", "service_unavailable", True)
    INTERNAL = _Kind("a bug, logged with its traceback", Status.INTERNAL, 500, "server_error", None, False)
    UNAUTHENTICATED = _Kind("no token, or a wrong one", Status.UNAUTHENTICATED, 401, "authentication_error",
                            "invalid_api_key", False)
    NOT_FOUND = _Kind("no such model", Status.NOT_FOUND, 404, "invalid_request_error", "model_not_found", False)
    BODY_TIMEOUT = _Kind("an HTTP body that did not arrive in time", Status.DEADLINE_EXCEEDED, 408,
                         "invalid_request_error", "request_timeout", True)
    TOO_LARGE = _Kind("a message over --max-message-bytes", Status.RESOURCE_EXHAUSTED, 413, "invalid_request_error",
                      "request_too_large", False)

    @property
    def status(self) -> Status:
        return self.value.status

    @property
    def http_status(self) -> int:
        return self.value.http_status

    @property
    def openai_type(self) -> str:
        return self.value.openai_type

    @property
    def openai_code(self) -> str | None:
        return self.value.openai_code

    @property
    def retryable(self) -> bool:
        return self.value.retryable


class RequestFailed(Exception):
    """A request refused or failed, by any layer. `field` is the request field it concerns, if any (named as
    chat.v1 names it: `prompt`, `params.top_p`, `history[2].user`); the message never repeats it, and `str()`
    is `field: message`. `retry_after_ms` is set when the caller should wait before retrying (FULL)."""

    def __init__(self, kind: Failure, message: str, *, field: str | None = None, retry_after_ms: int | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.kind = kind
        self.message = message
        self.field = field
        self.retry_after_ms = retry_after_ms


def left_early(deadline_passed: bool) -> Status:
    """The outcome of a request whose caller went away before its answer: DEADLINE_EXCEEDED if its deadline had
    passed by then, else CANCELLED."""
    return Status.DEADLINE_EXCEEDED if deadline_passed else Status.CANCELLED
