"""Domain types of a chat request and its answer. No protobuf: the transports convert at their boundary
(service/grpc/convert.py, service/http/)."""

from __future__ import annotations

from dataclasses import dataclass

from service.engine.request import Chunk, FinishReason, GenerationRequest, SamplingParams  # noqa: F401 (re-exported)
from service.models.base import Turn


@dataclass(frozen=True)
class RequestedParams:
    """Sampling fields as the client sent them; None where unset."""

    max_length: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class ChatInput:
    """A chat request as the domain sees it, whichever transport it came by."""

    prompt: str
    history: tuple[Turn, ...]
    system: str | None
    params: RequestedParams
    request_id: str
    priority: int = 0  # lower runs first (GenerationRequest.priority); checked by validation.check_priority


@dataclass(frozen=True)
class Answer:
    """A finished answer. `created` is the wall-clock time (seconds) the request was admitted."""

    text: str
    history: tuple[Turn, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    model: str
    created: float
    cached_prompt_tokens: int = 0  # of prompt_tokens, those whose KV came from the prefix cache


@dataclass(frozen=True)
class TokenCount:
    """What a chat input would take, found without the engine (CountTokens, POST /tokenize): its prompt ids
    (template, history and system message included), the per-request context, and the room the prompt leaves
    for the answer (validation.answer_room)."""

    prompt_ids: tuple[int, ...]
    context_length: int
    max_new_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)
