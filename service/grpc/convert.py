"""chat.v1 messages to and from the domain types (service/core/types.py), at the gRPC boundary."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from chat.v1 import chat_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from service.config import SamplingDefaults
from service.core.types import Answer, ChatInput, ChoiceAnswer, Chunk, RequestedParams, TokenCount, TokenLogprob
from service.engine.request import Constraint, ConstraintKind
from service.models.base import Turn

_OPTIONAL = ("max_length", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
             "top_logprobs", "min_p", "presence_penalty", "frequency_penalty", "min_new_tokens", "n")

TokenBytes = Callable[[int], bytes]  # a token id's bytes (ChatTokenizer.token_bytes)


def constraint(pb: chat_pb2.Constraint) -> Constraint | None:
    """The constraint the caller set, or None."""
    kind = pb.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "choice":
        return Constraint(ConstraintKind.CHOICE, tuple(pb.choice.values))
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT, None) if pb.json_object else None
    return Constraint(ConstraintKind(kind), getattr(pb, kind))


def requested_params(pb: chat_pb2.SamplingParams) -> RequestedParams:
    """The sampling fields the caller set; None for each `optional` field it left unset."""
    given = {name: getattr(pb, name) for name in _OPTIONAL if pb.HasField(name)}
    return RequestedParams(**given, stop=tuple(pb.stop), ignore_eos=pb.ignore_eos,
                           constraint=constraint(pb.constraint) if pb.HasField("constraint") else None,
                           logprobs=pb.logprobs, return_token_ids=pb.return_token_ids,
                           logit_bias=tuple(sorted(pb.logit_bias.items())), stop_token_ids=tuple(pb.stop_token_ids))


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


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def token_infos(tokens: Sequence[TokenLogprob], token_bytes: TokenBytes) -> list[chat_pb2.TokenInfo]:
    """Generated tokens as TokenInfo: id, text, bytes and, when reported, the logprob and top alternatives."""
    infos = []
    for token in tokens:
        data = token_bytes(token.id)
        top = [chat_pb2.TopLogprob(id=i, text=_text(token_bytes(i)), logprob=lp) for i, lp in token.top]
        infos.append(chat_pb2.TokenInfo(id=token.id, text=_text(data), bytes=data, logprob=token.logprob, top=top))
    return infos


def choice_pb(choice: ChoiceAnswer, token_bytes: TokenBytes) -> chat_pb2.Choice:
    return chat_pb2.Choice(index=choice.index, text=choice.text, finish_reason=int(choice.finish_reason),
                           tokens=token_infos(choice.tokens, token_bytes), stop_sequence=choice.stop_sequence)


def chat_response(answer: Answer, token_bytes: TokenBytes) -> chat_pb2.ChatResponse:
    """Chat's answer; `choices` only when the request asked for more than one."""
    choices = [choice_pb(c, token_bytes) for c in answer.choices] if len(answer.choices) > 1 else []
    return chat_pb2.ChatResponse(text=answer.text, history=history_pb(answer.history), usage=_usage(answer),
                                 finish_reason=int(answer.finish_reason), model=answer.model,
                                 created=_timestamp(answer.created), tokens=token_infos(answer.tokens, token_bytes),
                                 choices=choices, stop_sequence=answer.stop_sequence)


def chunk_pb(chunk: Chunk, model: str, token_bytes: TokenBytes) -> chat_pb2.ChatChunk:
    """An intermediate chunk of one answer."""
    return chat_pb2.ChatChunk(delta=chunk.text, token_count=chunk.token_count, model=model, index=chunk.index,
                              tokens=token_infos(chunk.tokens, token_bytes))


def last_chunk(choice: ChoiceAnswer, chunk: Chunk, model: str, created: float,
               token_bytes: TokenBytes) -> chat_pb2.ChatChunk:
    """An answer's last chunk: the rest of its text, its finish reason, its usage and the history with it."""
    usage = chat_pb2.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                           cached_prompt_tokens=chunk.cached_prompt_tokens)
    return chat_pb2.ChatChunk(delta=chunk.text, token_count=chunk.token_count, finish_reason=int(chunk.finish_reason),
                              usage=usage, history=history_pb(choice.history), model=model,
                              created=_timestamp(created), index=chunk.index,
                              tokens=token_infos(chunk.tokens, token_bytes), stop_sequence=chunk.stop_sequence)


def default_params(defaults: SamplingDefaults) -> chat_pb2.SamplingParams:
    return chat_pb2.SamplingParams(max_length=defaults.max_length, max_new_tokens=defaults.max_new_tokens,
                                   temperature=defaults.temperature, top_p=defaults.top_p, top_k=defaults.top_k,
                                   repetition_penalty=defaults.repetition_penalty)


def count_tokens_response(count: TokenCount, *, with_ids: bool) -> chat_pb2.CountTokensResponse:
    """CountTokens' answer; the prompt's ids only when the request asked for them (params.return_token_ids)."""
    return chat_pb2.CountTokensResponse(prompt_tokens=count.prompt_tokens, context_length=count.context_length,
                                        max_new_tokens=count.max_new_tokens,
                                        token_ids=count.prompt_ids if with_ids else ())
