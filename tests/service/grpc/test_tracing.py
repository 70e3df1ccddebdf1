"""OpenTelemetry tracing through the SDK's in-memory exporter: one span per chat.v1 RPC, in the caller's trace,
with the request's id, token counts, TTFT and finish reason; nothing imported when tracing is off."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from chat.v1 import chat_pb2, chat_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.grpc.tracing import Tracing
from service.runtime import Runtime
from tests.conftest import ServerThread, make_config
from tests.support import until

pytestmark = pytest.mark.slow

TRACE_ID, PARENT_ID = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331


@pytest.fixture(scope="module")
def traced(server):
    exporter = InMemorySpanExporter()
    config = make_config(max_batch_size=2, max_queued_requests=4)
    running = ServerThread(config, loaded=server.engine.loaded)
    running.runtime = Runtime(config, tracing=Tracing(exporter=exporter))
    running.start()
    yield running, exporter
    running.stop()


def request(**params) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(prompt="What is the capital of France?", request_id="traced-1",
                                params=chat_pb2.SamplingParams(temperature=0.0, max_new_tokens=3, **params))


async def test_one_span_per_rpc_in_the_callers_trace_with_the_requests_figures(traced):
    running, exporter = traced
    exporter.clear()
    metadata = (("traceparent", f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"),)
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        answer = await stub.Chat(request(), metadata=metadata, timeout=60)
        chunks = [chunk async for chunk in stub.StreamChat(request(), timeout=60)]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Chat(request(top_p=0.0), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert await until(lambda: len(exporter.get_finished_spans()) >= 3)
    spans = {}
    for span in exporter.get_finished_spans():
        spans.setdefault(span.name, []).append(span)
    assert set(spans) == {"/chat.v1.ChatService/Chat", "/chat.v1.ChatService/StreamChat"}  # health not traced
    ok, invalid = spans["/chat.v1.ChatService/Chat"]
    assert ok.context.trace_id == TRACE_ID and ok.parent.span_id == PARENT_ID  # the caller's trace context
    attributes = dict(ok.attributes)
    assert attributes["chat.request_id"] == "traced-1" and attributes["chat.status"] == "OK"
    assert attributes["chat.prompt_tokens"] == answer.usage.prompt_tokens
    assert attributes["chat.completion_tokens"] == answer.usage.completion_tokens == 3
    assert attributes["chat.finish_reason"] == "LENGTH"
    assert 0 < attributes["chat.time_to_first_token_s"] < 60
    (stream,) = spans["/chat.v1.ChatService/StreamChat"]
    assert stream.context.trace_id != TRACE_ID  # no caller context: a trace of its own
    assert dict(stream.attributes)["chat.completion_tokens"] == chunks[-1].usage.completion_tokens == 3
    invalid_attributes = dict(invalid.attributes)
    assert invalid_attributes["chat.status"] == "INVALID_ARGUMENT" and invalid_attributes["chat.prompt_tokens"] == 0
    assert invalid_attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_tracing_off_imports_nothing():
    code = ("import sys; from service.config import ServerConfig; from service.runtime import Runtime; "
            "runtime = Runtime(ServerConfig()); "
            "print(runtime.tracing, sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "None []", out.stdout + out.stderr
