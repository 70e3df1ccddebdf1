"""Health for orchestrators: on SIGTERM readiness goes NOT_SERVING first, the server keeps taking calls for
--drain-delay-seconds, and only then refuses new calls and drains; liveness stays SERVING meanwhile."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from chat.v1 import chat_pb2, chat_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ServerThread, make_config

pytestmark = pytest.mark.slow

DELAY = 3.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def hello() -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(prompt="Hello", params=chat_pb2.SamplingParams(temperature=0.0, max_new_tokens=2))


async def test_drain_delay_readiness_first_then_calls_then_refusals(server):
    draining = ServerThread(make_config({"drain_delay_seconds": DELAY}, max_batch_size=2, max_queued_requests=4),
                            loaded=server.engine.loaded).start()
    async with grpc.aio.insecure_channel(draining.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        readiness = health.Watch(health_pb2.HealthCheckRequest(service="chat.v1.ChatService"), timeout=60)
        assert (await readiness.read()).status == SERVING
        long = chat.StreamChat(chat_pb2.ChatRequest(prompt="Tell me a long story.", params=chat_pb2.SamplingParams(
            temperature=0.0, max_new_tokens=1000, ignore_eos=True)), timeout=60)
        await long.read()  # in flight: the drain after the delay waits for it (up to the grace period)
        signalled = time.monotonic()
        stopping = asyncio.get_running_loop().run_in_executor(None, draining.stop)  # what SIGTERM starts
        assert (await readiness.read()).status == NOT_SERVING
        assert time.monotonic() - signalled < 1.0  # readiness goes first, at once
        liveness = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert liveness.status == SERVING  # alive: no restart while draining
        answer = await chat.Chat(hello(), timeout=30)  # still taking calls during the delay
        assert answer.usage.completion_tokens == 2
        assert time.monotonic() - signalled < DELAY, "the call was not answered inside the delay"
        await asyncio.sleep(DELAY + 0.3 - (time.monotonic() - signalled))
        with pytest.raises(grpc.aio.AioRpcError) as err:  # after the delay: refused, so callers go elsewhere
            await chat.Chat(hello(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
        long.cancel()
        await stopping
