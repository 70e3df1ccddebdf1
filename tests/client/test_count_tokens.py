"""ChatClient.count_tokens and AsyncChatClient.count_tokens against the chat servicer over a scripted engine (no
model): the same arguments as chat, the ids only with return_token_ids, and Chat's refusal as a grpc.RpcError.
Against the real model: tests/service/grpc/test_servicer.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from chat.v1 import chat_pb2_grpc

from client.chat_client import AsyncChatClient, ChatClient, build_request
from service.config import ServerConfig
from service.core.frontend import Frontend
from service.grpc.servicer import ChatServicer
from tests.support import ScriptedEngine

HISTORY = [("Hi there", "Hello!")]


@pytest.fixture(scope="module")
async def address():
    frontend = Frontend(ServerConfig())
    frontend.set_engine(ScriptedEngine(context=1000))
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(frontend.config, frontend), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)
    frontend.close()


def test_build_request_carries_return_token_ids():
    assert build_request("hi", return_token_ids=True).params.return_token_ids
    assert not build_request("hi").params.return_token_ids


async def test_the_async_client_counts(address):
    async with AsyncChatClient(address, timeout=10) as client:
        counted = await client.count_tokens("What is the capital of France?", HISTORY, system="Be brief.")
        with_ids = await client.count_tokens("What is the capital of France?", HISTORY, system="Be brief.",
                                             return_token_ids=True, max_length=100)
        usage = (await client.chat_response("What is the capital of France?", HISTORY, system="Be brief.")).usage
    assert counted.prompt_tokens == usage.prompt_tokens == 11 and list(counted.token_ids) == []
    assert counted.context_length == 1000 and counted.max_new_tokens == 1000 - 11  # default max_length 2048 > 1000
    assert list(with_ids.token_ids) == list(range(11)) and with_ids.max_new_tokens == 100 - 11


async def test_the_sync_client_counts_and_raises_where_chat_would(address):
    def calls():
        with ChatClient(address, timeout=10) as client:
            counted = client.count_tokens("What is the capital of France?", HISTORY, return_token_ids=True)
            with pytest.raises(grpc.RpcError) as err:
                client.count_tokens("Hi", top_p=2.0)
            return counted, err.value

    counted, error = await asyncio.to_thread(calls)  # the server runs on this test's event loop
    assert counted.prompt_tokens == 9 and list(counted.token_ids) == list(range(9))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("params.top_p: ")
