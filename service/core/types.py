"""Domain types of a chat request and its answer, converted to and from chat.v1 messages at the boundary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from chat.v1 import chat_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from service.config import SamplingDefaults
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

    @classmethod
    def from_pb(cls, pb: chat_pb2.SamplingParams) -> RequestedParams:
        def get(name):
            return getattr(pb, name) if pb.HasField(name) else None

        return cls(
            max_length=get("max_length"),
            max_new_tokens=get("max_new_tokens"),
            temperature=get("temperature"),
            top_p=get("top_p"),
            top_k=get("top_k"),
            repetition_penalty=get("repetition_penalty"),
            seed=get("seed"),
            stop=tuple(pb.stop),
            ignore_eos=pb.ignore_eos,
        )


@dataclass(frozen=True)
class ChatInput:
    """A ChatRequest as the domain sees it."""

    prompt: str
    history: tuple[Turn, ...]
    system: str | None
    params: RequestedParams
    request_id: str

    @classmethod
    def from_pb(cls, pb: chat_pb2.ChatRequest) -> ChatInput:
        return cls(
            prompt=pb.prompt,
            history=tuple(Turn(user=t.user, assistant=t.assistant) for t in pb.history),
            system=pb.system if pb.HasField("system") else None,
            params=RequestedParams.from_pb(pb.params),
            request_id=pb.request_id,
        )


@dataclass
class Answer:
    """A finished answer, ready for the wire."""

    text: str
    history: tuple[Turn, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    model: str
    created: float = field(default_factory=time.time)

    def _timestamp(self) -> Timestamp:
        stamp = Timestamp()
        stamp.FromNanoseconds(int(self.created * 1e9))
        return stamp

    def _usage(self) -> chat_pb2.Usage:
        return chat_pb2.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)

    def to_pb(self) -> chat_pb2.ChatResponse:
        return chat_pb2.ChatResponse(
            text=self.text,
            history=history_to_pb(self.history),
            usage=self._usage(),
            finish_reason=int(self.finish_reason),
            model=self.model,
            created=self._timestamp(),
        )

    def last_chunk_pb(self, delta: str, token_count: int) -> chat_pb2.ChatChunk:
        return chat_pb2.ChatChunk(
            delta=delta,
            token_count=token_count,
            finish_reason=int(self.finish_reason),
            usage=self._usage(),
            history=history_to_pb(self.history),
            model=self.model,
            created=self._timestamp(),
        )


def history_to_pb(history: tuple[Turn, ...]) -> list[chat_pb2.Turn]:
    return [chat_pb2.Turn(user=t.user, assistant=t.assistant) for t in history]


def defaults_to_pb(defaults: SamplingDefaults) -> chat_pb2.SamplingParams:
    return chat_pb2.SamplingParams(
        max_length=defaults.max_length,
        max_new_tokens=defaults.max_new_tokens,
        temperature=defaults.temperature,
        top_p=defaults.top_p,
        top_k=defaults.top_k,
        repetition_penalty=defaults.repetition_penalty,
    )
