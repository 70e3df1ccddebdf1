"""Domain types of a chat request and its answer. No protobuf: the transports convert at their boundary
(service/grpc/convert.py, service/http/)."""

from __future__ import annotations

from dataclasses import dataclass

from service.engine.request import (  # noqa: F401 (re-exported)
    Chunk,
    Constraint,
    ConstraintKind,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)
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
    constraint: Constraint | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    return_token_ids: bool = False
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) in the order sent
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int | None = None
    n: int | None = None


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
class ChoiceAnswer:
    """One of a request's n answers, finished."""

    index: int
    text: str
    history: tuple[Turn, ...]  # the request's history with this answer appended
    finish_reason: FinishReason
    completion_tokens: int
    tokens: tuple[TokenLogprob, ...] = ()  # when the request asked for them
    stop_sequence: str = ""  # the stop string or stop token's text that ended it


@dataclass(frozen=True)
class Answer:
    """A finished answer. `created` is the wall-clock time (seconds) the request was admitted. With n answers,
    text, history, finish_reason, tokens and stop_sequence are choice 0's, and completion_tokens counts all."""

    text: str
    history: tuple[Turn, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    model: str
    created: float
    cached_prompt_tokens: int = 0  # of prompt_tokens, those whose KV came from the prefix cache
    choices: tuple[ChoiceAnswer, ...] = ()  # every answer, by index
    tokens: tuple[TokenLogprob, ...] = ()
    stop_sequence: str = ""


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
