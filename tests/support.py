"""Small helpers shared by the service tests: waiting for a condition, raw gRPC over HTTP/2, busy streams, and a
scripted engine that runs the request path (frontend, servicer, HTTP routes) in milliseconds, without a model."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace

import aiohttp
import h2.config
import h2.connection
import h2.events

from service.engine.request import Chunk, FinishReason, GenerationRequest
from service.engine.stats import EngineStats

# Where the tests' models run: CHAT_TEST_DEVICE (default cpu, so a GPU host runs the suite as CI does;
# scripts/gpu_check.sh sets cuda). Server subprocesses read it as CHAT_DEVICE (conftest.py).
TEST_DEVICE = os.environ.get("CHAT_TEST_DEVICE", "cpu")


async def until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Wait for `predicate()` to hold; False if it still doesn't after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


@asynccontextmanager
async def busy(client, engine, count: int, *, waiting: int = 0):
    """`count` long greedy streams that fill the batch until the block ends (then they are cancelled)."""
    calls = [client.stream_chunks(f"Tell me a very long story about ship number {i}.", temperature=0.0,
                                  max_new_tokens=600, ignore_eos=True, timeout=120) for i in range(count)]
    try:
        assert await until(lambda: engine.stats.running >= count - waiting and engine.stats.waiting >= waiting), \
            (engine.stats, count, waiting)
        yield calls
    finally:
        for call in calls:
            call.cancel()


def raw_grpc_call(port: int, path: str, message: bytes, timeout: float = 10.0) -> list[h2.events.Event]:
    """One gRPC call made by hand over HTTP/2 (plaintext); the events of its stream, in order.

    This is how a test can see the frames themselves, e.g. that a refusal is Trailers-Only: a single
    HEADERS frame with END_STREAM that carries grpc-status, no response headers before it, no DATA.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [
            (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"), ("te", "trailers"),
        ])
        conn.send_data(stream_id, b"\x00" + struct.pack(">I", len(message)) + message, end_stream=True)
        sock.sendall(conn.data_to_send())
        events: list[h2.events.Event] = []
        while True:
            data = sock.recv(65536)
            if not data:
                return events
            for event in conn.receive_data(data):
                if getattr(event, "stream_id", None) != stream_id:
                    continue
                events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return events
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()


async def post_json(port: int, path: str, body, headers: dict | None = None, timeout: float = 120):
    """(status, JSON body or text, headers) of one POST to the HTTP listener; `body` is sent as is when bytes,
    else as JSON (json.dumps escapes lone surrogates as \\udXXX, which JSON allows)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{port}{path}", data=data,
            headers={"Content-Type": "application/json", **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=timeout)) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text), response.headers
        except ValueError:
            return response.status, text, response.headers


class ScriptedHandle:
    """What `ScriptedEngine.submit` returns: the handle's surface the frontend uses, streaming a fixed answer."""

    def __init__(self, request: GenerationRequest, chunks: list[Chunk]):
        self.request = request
        self.chunks = chunks
        self.submitted_at = self.scheduled_at = time.monotonic()
        self.cancelled = False

    async def stream(self):
        for chunk in self.chunks:
            yield chunk

    def cancel(self) -> None:
        self.cancelled = True

    def fail(self, error) -> None:
        raise AssertionError(f"a scripted request was failed: {error}")


class ScriptedEngine:
    """An engine stand-in for the request path's own tests: it keeps every GenerationRequest it is given
    (`requests`) and answers each with "Hello there." in two chunks, the last carrying the usage, with
    `cached_prompt_tokens` of the prompt reported as reused from the prefix cache. Its tokenizer gives one id
    per word of the prompt, history and system message. Hand it to `Frontend.set_engine`."""

    def __init__(self, cached_prompt_tokens: int = 0, context: int = 2048, vocab_size: int = 1000):
        self.cached_prompt_tokens = cached_prompt_tokens
        self.requests: list[GenerationRequest] = []
        self.max_context = context
        tokenizer = SimpleNamespace(encode_chat=lambda prompt, history, system: list(range(len(
            " ".join([system or "", prompt, *(t.user + " " + t.assistant for t in history)]).split()))))
        self.loaded = SimpleNamespace(name="scripted", vocab_size=vocab_size, default_max_length=None,
                                      tokenizer=tokenizer)
        self.stats = EngineStats(kv_capacity_tokens=context)

    def submit(self, request: GenerationRequest) -> ScriptedHandle:
        self.requests.append(request)
        prompt = len(request.prompt_ids)
        return ScriptedHandle(request, [
            Chunk(text="Hello", token_count=1),
            Chunk(text=" there.", token_count=2, finish_reason=FinishReason.STOP, prompt_tokens=prompt,
                  completion_tokens=3, cached_prompt_tokens=min(self.cached_prompt_tokens, prompt)),
        ])


@asynccontextmanager
async def scripted_grpc(config, engine: ScriptedEngine):
    """A chat stub on a grpc.aio server (free port) whose servicer runs over `engine` behind a Frontend of
    `config`."""
    import grpc
    from chat.v1 import chat_pb2_grpc

    from service.core.frontend import Frontend
    from service.grpc.servicer import ChatServicer

    frontend = Frontend(config)
    frontend.set_engine(engine)
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(config, frontend), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield chat_pb2_grpc.ChatServiceStub(channel)
    finally:
        await server.stop(None)
        frontend.close()
