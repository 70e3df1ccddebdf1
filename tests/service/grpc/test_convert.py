"""ChatRequest.priority and Usage.cached_prompt_tokens at the gRPC boundary: converted both ways, and over a real
grpc.aio server whose servicer runs on a scripted engine (no model): a priority out of range is
INVALID_ARGUMENT naming `priority`, a valid one reaches GenerationRequest.priority, and a last chunk's
cached_prompt_tokens reaches the usage of Chat and of StreamChat's last chunk."""

from __future__ import annotations

import grpc
import pytest
from chat.v1 import chat_pb2

from service.config import ServerConfig
from service.core.types import Answer, ChoiceAnswer, Chunk, FinishReason
from service.core.validation import MAX_PRIORITY
from service.grpc import convert
from service.models.base import Turn
from tests.support import ScriptedEngine, scripted_grpc

CACHED = 5


def NO_TOKENS(token: int) -> bytes:  # noqa: N802 (a token_bytes stand-in: these answers carry no tokens)
    raise AssertionError("no token is described")


def answer(cached: int) -> Answer:
    return Answer(text="Paris.", history=(Turn(user="Capital of France?", assistant="Paris."),), prompt_tokens=9,
                  completion_tokens=2, finish_reason=FinishReason.STOP, model="m", created=1.5,
                  cached_prompt_tokens=cached)


def test_chat_input_carries_the_priority():
    assert convert.chat_input(chat_pb2.ChatRequest(prompt="Hi", priority=-3)).priority == -3
    assert convert.chat_input(chat_pb2.ChatRequest(prompt="Hi")).priority == 0


def test_the_usage_carries_the_cached_prompt_tokens():
    response = convert.chat_response(answer(cached=7), NO_TOKENS)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens,
            response.usage.cached_prompt_tokens) == (9, 2, 7)
    last = Chunk(text="", token_count=0, finish_reason=FinishReason.STOP, prompt_tokens=9, completion_tokens=2,
                 cached_prompt_tokens=7)
    choice = ChoiceAnswer(index=0, text="Paris.", history=answer(7).history, finish_reason=FinishReason.STOP,
                          completion_tokens=2)
    assert convert.last_chunk(choice, last, "m", 1.5, NO_TOKENS).usage.cached_prompt_tokens == 7
    assert convert.chat_response(answer(cached=0), NO_TOKENS).usage.cached_prompt_tokens == 0


@pytest.fixture(scope="module")
async def scripted():
    """(stub, engine): a grpc.aio server on a free port with the chat servicer over a scripted engine."""
    engine = ScriptedEngine(cached_prompt_tokens=CACHED)
    async with scripted_grpc(ServerConfig(), engine) as stub:
        yield stub, engine


async def call(stub, rpc: str, request: chat_pb2.ChatRequest):
    if rpc == "Chat":
        return await stub.Chat(request, timeout=10)
    return [chunk async for chunk in stub.StreamChat(request, timeout=10)][-1]


@pytest.mark.parametrize("rpc", ["Chat", "StreamChat"])
@pytest.mark.parametrize("priority", [MAX_PRIORITY + 1, -MAX_PRIORITY - 1, 2**31 - 1, -(2**31)])
async def test_a_priority_out_of_range_is_invalid_argument(scripted, rpc, priority):
    stub, engine = scripted
    submitted = len(engine.requests)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(stub, rpc, chat_pb2.ChatRequest(prompt="Hi", priority=priority))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("priority: must be in ["), err.value.details()
    assert len(engine.requests) == submitted  # nothing reached the engine


@pytest.mark.parametrize("rpc", ["Chat", "StreamChat"])
@pytest.mark.parametrize("priority", [-MAX_PRIORITY, -1, 0, 42, MAX_PRIORITY])
async def test_a_valid_priority_reaches_the_engine_and_the_usage_has_the_cached_tokens(scripted, rpc, priority):
    stub, engine = scripted
    last = await call(stub, rpc, chat_pb2.ChatRequest(prompt="What is the capital of France?", priority=priority))
    assert engine.requests[-1].priority == priority
    assert last.usage.prompt_tokens == 6 and last.usage.cached_prompt_tokens == CACHED
    assert last.usage.completion_tokens == 3 and last.finish_reason == chat_pb2.FINISH_REASON_STOP
