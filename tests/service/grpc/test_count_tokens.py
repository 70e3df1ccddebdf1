"""CountTokens at the gRPC boundary, over a real grpc.aio server whose servicer runs on a scripted engine (no model):
the response's fields, token_ids only when params.return_token_ids is set, Chat's own INVALID_ARGUMENT (same
details) where Chat would refuse, and no engine work. The real model's counts against Chat's usage are in
test_servicer.py."""

from __future__ import annotations

import grpc
import pytest
from chat.v1 import chat_pb2

from service.config import SamplingDefaults, ServerConfig
from service.core.types import TokenCount
from service.grpc import convert
from tests.support import ScriptedEngine, scripted_grpc

CONTEXT = 400


def test_the_response_carries_the_ids_only_when_asked():
    count = TokenCount(prompt_ids=(5, 6, 7), context_length=100, max_new_tokens=90)
    plain = convert.count_tokens_response(count, with_ids=False)
    assert (plain.prompt_tokens, plain.context_length, plain.max_new_tokens, list(plain.token_ids)) == (3, 100, 90, [])
    assert list(convert.count_tokens_response(count, with_ids=True).token_ids) == [5, 6, 7]


@pytest.fixture(scope="module")
async def scripted():
    """(stub, engine): the chat servicer on a free port over a scripted engine with a 400-token context."""
    engine = ScriptedEngine(context=CONTEXT)
    async with scripted_grpc(ServerConfig(defaults=SamplingDefaults(max_length=100)), engine) as stub:
        yield stub, engine


def request(prompt: str = "What is the capital of France?", **params) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(prompt=prompt, history=[chat_pb2.Turn(user="Hi there", assistant="Hello!")],
                                system="Be brief.", params=chat_pb2.SamplingParams(**params))


async def test_count_tokens_equals_chats_usage_with_ids_only_when_asked(scripted):
    stub, engine = scripted
    counted = await stub.CountTokens(request(), timeout=10)
    answered = await stub.Chat(request(), timeout=10)
    assert counted.prompt_tokens == answered.usage.prompt_tokens == 11
    assert counted.context_length == CONTEXT
    assert counted.max_new_tokens == 100 - 11  # the default max_length, the way resolve bounds it
    assert list(counted.token_ids) == []
    with_ids = await stub.CountTokens(request(return_token_ids=True), timeout=10)
    assert list(with_ids.token_ids) == engine.requests[-1].prompt_ids
    assert (with_ids.prompt_tokens, with_ids.max_new_tokens) == (counted.prompt_tokens, counted.max_new_tokens)
    # Chat takes the same request, return_token_ids and all
    assert (await stub.Chat(request(return_token_ids=True), timeout=10)).usage.prompt_tokens == 11


async def test_max_new_tokens_follows_the_requests_max_length(scripted):
    stub, _ = scripted
    assert (await stub.CountTokens(request(max_length=40), timeout=10)).max_new_tokens == 40 - 11
    assert (await stub.CountTokens(request(max_length=CONTEXT), timeout=10)).max_new_tokens == CONTEXT - 11


REFUSED = [
    ("prompt", request(" ".join(["word"] * 395))),  # 400 tokens: the whole context, no room for an answer
    ("prompt", request("a b c", max_length=8)),  # 8 tokens: not under max_length
    ("params.max_new_tokens", request(" ".join(["word"] * 300), max_new_tokens=100)),
    ("params.max_new_tokens", request(max_new_tokens=0)),
    ("params.top_p", request(top_p=1.5)),
    ("params.temperature", request(temperature=float("nan"))),
    ("params.max_length", request(max_length=CONTEXT + 1)),
    ("prompt", request("")),
    ("priority", chat_pb2.ChatRequest(prompt="Hi", priority=2_000_000)),
]


@pytest.mark.parametrize("field, given", REFUSED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(REFUSED)])
async def test_a_refusal_is_chats_invalid_argument(scripted, field, given):
    stub, engine = scripted
    submitted = len(engine.requests)
    with pytest.raises(grpc.aio.AioRpcError) as counted:
        await stub.CountTokens(given, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as chatted:
        await stub.Chat(given, timeout=10)
    assert counted.value.code() == chatted.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert counted.value.details() == chatted.value.details()
    assert counted.value.details().startswith(f"{field}: "), counted.value.details()
    assert len(engine.requests) == submitted


async def test_counting_submits_nothing(scripted):
    stub, engine = scripted
    submitted, created = len(engine.requests), engine.stats.created
    for i in range(5):
        await stub.CountTokens(request(f"Question number {i}?"), timeout=10)
    assert len(engine.requests) == submitted and engine.stats.created == created
