"""The record of one request, made once when it ends: what the metrics, the tracing spans and the log line read."""

from __future__ import annotations

from dataclasses import dataclass

from service.failures import Status


@dataclass(frozen=True)
class RequestRecord:
    """How one request ended, as the frontend saw it: its status (OK, CANCELLED, RESOURCE_EXHAUSTED, ...) and
    figures; times are in seconds, None where they do not apply."""

    model: str
    code: Status
    finish_reason: str | None = None  # set when code is OK
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those reused from the prefix cache (from the last chunk)
    admitted: bool = False  # reached the engine: it gets the per-request histograms
    e2e: float | None = None
    queue_time: float | None = None
    ttft: float | None = None
    itl: float | None = None  # the mean gap between its tokens after the first
