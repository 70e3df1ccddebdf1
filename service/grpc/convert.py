"""chat.v1 messages to and from the domain types (service/core/types.py), at the gRPC boundary."""

from __future__ import annotations

from chat.v1 import chat_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from service.config import SamplingDefaults
from service.core.types import Answer, ChatInput, RequestedParams, TokenCount
from service.models.base import Turn

_OPTIONAL = ("max_length", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def requested_params(pb: chat_pb2.SamplingParams) -> RequestedParams:
    """The sampling fields the caller set; None for each `optional` field it left unset."""
    given = {name: getattr(pb, name) for name in _OPTIONAL if pb.HasField(name)}
    return RequestedParams(**given, stop=tuple(pb.stop), ignore_eos=pb.ignore_eos)


def chat_input(pb: chat_pb2.ChatRequest) -> ChatInput:
    return ChatInput(
        prompt=pb.prompt,
        history=tuple(Turn(user=t.user, assistant=t.assistant) for t in pb.history),
        system=pb.system if pb.HasField("system") else None,
        params=requested_params(pb.params),
        request_id=pb.request_id,
        priority=pb.priority,
    )


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _usage(answer: Answer) -> chat_pb2.Usage:
    return chat_pb2.Usage(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                          cached_prompt_tokens=answer.cached_prompt_tokens)


def history_pb(history: tuple[Turn, ...]) -> list[chat_pb2.Turn]:
    return [chat_pb2.Turn(user=t.user, assistant=t.assistant) for t in history]


def chat_response(answer: Answer) -> chat_pb2.ChatResponse:
    return chat_pb2.ChatResponse(text=answer.text, history=history_pb(answer.history), usage=_usage(answer),
                                 finish_reason=int(answer.finish_reason), model=answer.model,
                                 created=_timestamp(answer.created))


def last_chunk(answer: Answer, delta: str, token_count: int) -> chat_pb2.ChatChunk:
    """The stream's last chunk: the rest of the text, the finish reason, usage and history."""
    return chat_pb2.ChatChunk(delta=delta, token_count=token_count, finish_reason=int(answer.finish_reason),
                              usage=_usage(answer), history=history_pb(answer.history), model=answer.model,
                              created=_timestamp(answer.created))


def default_params(defaults: SamplingDefaults) -> chat_pb2.SamplingParams:
    return chat_pb2.SamplingParams(max_length=defaults.max_length, max_new_tokens=defaults.max_new_tokens,
                                   temperature=defaults.temperature, top_p=defaults.top_p, top_k=defaults.top_k,
                                   repetition_penalty=defaults.repetition_penalty)


def count_tokens_response(count: TokenCount, *, with_ids: bool) -> chat_pb2.CountTokensResponse:
    """CountTokens' answer; the prompt's ids only when the request asked for them (params.return_token_ids)."""
    return chat_pb2.CountTokensResponse(prompt_tokens=count.prompt_tokens, context_length=count.context_length,
                                        max_new_tokens=count.max_new_tokens,
                                        token_ids=count.prompt_ids if with_ids else ())
