"""Hostile input against the running session server: property-based ChatRequests, undecodable messages and
raw garbage on the port. The server answers with a deliberate status every time and keeps SERVING."""

from __future__ import annotations

import os
import random
import socket
import struct

import grpc
import pytest
from chat.v1 import chat_pb2, chat_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.config import SamplingDefaults

# Not DEADLINE_EXCEEDED: every answer here is short (a few tokens), so a call that runs out its deadline hung.
EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=int(os.environ.get("CHAT_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

INT32 = st.integers(-(2**31), 2**31 - 1)
# Any text protobuf can carry: every code point except surrogates (which are not valid UTF-8).
TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)
WORDS = st.text(alphabet=st.characters(exclude_categories=("Cs", "Cc", "Z")), min_size=1, max_size=30)


def mostly(valid, invalid):
    """Usually a valid value, sometimes a hostile one, so that whole requests are often valid too."""
    return st.one_of(valid, valid, valid, valid, valid, invalid)


HOSTILE_FLOATS = st.floats(width=32) | st.sampled_from([-1.0, 0.0, 1e-9, 1.0000001, 101.0])
# "a " * 9000: more tokens than the default model's whole context (8192), so refused whatever max_length says
PROMPTS = mostly(WORDS, TEXT | st.sampled_from(["", "   \n\t", "x" * 100_001, "\x00\x01", "a " * 9000]))
MAX_NEW_TOKENS = mostly(st.integers(1, 6), st.sampled_from([0, -1, -(2**31), 2**31 - 1, 8191, 8192]))

CONSTRAINTS = st.sampled_from([
    chat_pb2.Constraint(json_object=True), chat_pb2.Constraint(regex="[a-z]{1,5}"),
    chat_pb2.Constraint(choice=chat_pb2.Choices(values=["yes", "no"])),
    chat_pb2.Constraint(json_schema='{"type": "object", "properties": {"a": {"type": "integer"}}}'),
    chat_pb2.Constraint(grammar='start: "a"+ "b"')])
HOSTILE_CONSTRAINTS = st.one_of(
    st.builds(lambda t: chat_pb2.Constraint(json_schema=t), TEXT | st.sampled_from(["[" * 100_000, '{"type": 5}'])),
    st.builds(lambda t: chat_pb2.Constraint(regex=t), TEXT | st.sampled_from(["(", "(a|b)*a(a|b){64}"])),
    st.builds(lambda v: chat_pb2.Constraint(choice=chat_pb2.Choices(values=v)), st.lists(TEXT, max_size=4)),
    st.builds(lambda t: chat_pb2.Constraint(grammar=t), TEXT),
    st.builds(lambda b: chat_pb2.Constraint(json_object=b), st.booleans()))

PARAMS = st.fixed_dictionaries({"max_new_tokens": MAX_NEW_TOKENS}, optional={  # never unset: answers stay short
    "max_length": mostly(st.integers(100, 8192), st.integers(-5, 99) | INT32),
    "temperature": mostly(st.sampled_from([0.0]) | st.floats(0.03125, 100, width=32), HOSTILE_FLOATS),
    "top_p": mostly(st.floats(0.0625, 1.0, width=32), HOSTILE_FLOATS),
    "top_k": mostly(st.integers(0, 100), INT32),
    "repetition_penalty": mostly(st.floats(0.5, 2.0, width=32), HOSTILE_FLOATS),
    "seed": st.integers(0, 2**64 - 1),
    "ignore_eos": st.booleans(),
    "stop": mostly(st.lists(WORDS, max_size=3), st.lists(TEXT | st.text(max_size=70, alphabet="ab"), max_size=10)),
    # the callers' sampling set (issue 19)
    "min_p": mostly(st.floats(0.0, 1.0, width=32), HOSTILE_FLOATS),
    "presence_penalty": mostly(st.floats(-2.0, 2.0, width=32), HOSTILE_FLOATS),
    "frequency_penalty": mostly(st.floats(-2.0, 2.0, width=32), HOSTILE_FLOATS),
    "logit_bias": mostly(st.dictionaries(st.integers(0, 49151), st.floats(-100, 100, width=32), max_size=3),
                         st.dictionaries(INT32, HOSTILE_FLOATS, max_size=3)),
    "stop_token_ids": mostly(st.lists(st.integers(0, 49151), max_size=3), st.lists(INT32, max_size=70)),
    "min_new_tokens": mostly(st.integers(0, 3), INT32),
    "n": mostly(st.integers(1, 3), INT32),
    "logprobs": st.booleans(),
    "top_logprobs": mostly(st.integers(0, 20), INT32),
    "return_token_ids": st.booleans(),
    "constraint": mostly(CONSTRAINTS, HOSTILE_CONSTRAINTS),
})


@st.composite
def chat_requests(draw) -> chat_pb2.ChatRequest:
    request = chat_pb2.ChatRequest(
        prompt=draw(PROMPTS),
        history=[chat_pb2.Turn(user=u, assistant=a)
                 for u, a in draw(st.lists(mostly(st.tuples(WORDS, WORDS), st.tuples(TEXT, TEXT)), max_size=3))],
        params=chat_pb2.SamplingParams(**draw(PARAMS)),
        request_id=draw(TEXT),
    )
    system = draw(st.none() | st.none() | WORDS | TEXT)
    if system is not None:
        request.system = system
    return request


@pytest.fixture(scope="module")
def stub(channel):
    return chat_pb2_grpc.ChatServiceStub(channel)


def serving(channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def call(stub, rpc: str, request, timeout: float = 10):
    """(status code, the reply's text, its last message or None)."""
    try:
        if rpc == "Chat":
            reply = stub.Chat(request, timeout=timeout)
            return grpc.StatusCode.OK, reply.text, reply
        chunks = list(stub.StreamChat(request, timeout=timeout))
        return grpc.StatusCode.OK, "".join(c.delta for c in chunks), chunks[-1]
    except grpc.RpcError as err:
        assert err.code() in EXPECTED, (err.code(), err.details())
        if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
            field = err.details().split(":")[0]
            assert field.split("[")[0].split(".")[0] in ("prompt", "history", "system", "params"), err.details()
        return err.code(), err.details(), None


def reproducible(params: chat_pb2.SamplingParams) -> bool:
    return params.HasField("seed") or (params.HasField("temperature") and params.temperature == 0)


@pytest.mark.slow
@FUZZ
@given(request=chat_requests())
def test_fuzzed_requests_get_a_deliberate_status(server, stub, request):
    """Each request goes to both RPCs: a deliberate status from each, the same one, and (when the answer is
    reproducible) the same text."""
    chat_code, chat_text, chat_reply = call(stub, "Chat", request)
    stream_code, stream_text, last_chunk = call(stub, "StreamChat", request)
    invalid = chat_code == grpc.StatusCode.INVALID_ARGUMENT
    event(f"{chat_code.name} {chat_text.split(':')[0]}" if invalid else chat_code.name)  # --hypothesis-show-statistics
    transient = {grpc.StatusCode.RESOURCE_EXHAUSTED}
    if chat_code not in transient and stream_code not in transient:
        assert chat_code == stream_code, (chat_text, stream_text)
        if chat_code == grpc.StatusCode.INVALID_ARGUMENT:
            assert chat_text == stream_text  # the same field named the same way
    for reply in (chat_reply, last_chunk):
        if reply is not None:
            assert reply.finish_reason != chat_pb2.FINISH_REASON_UNSPECIFIED
            assert 0 < reply.usage.completion_tokens <= request.params.max_new_tokens * max(1, request.params.n)
    if chat_reply is not None and last_chunk is not None and reproducible(request.params):
        assert chat_text == stream_text
    count_code, count_text, counted = count(stub, request)  # refused exactly where Chat refuses the input
    if chat_code not in transient:
        assert count_code == chat_code, (count_text, chat_text)
    if chat_code == grpc.StatusCode.INVALID_ARGUMENT:
        assert count_text == chat_text
    if chat_reply is not None:
        assert counted.prompt_tokens == chat_reply.usage.prompt_tokens


def count(stub, request, timeout: float = 10):
    """(status code, the details or "", the CountTokensResponse or None)."""
    try:
        return grpc.StatusCode.OK, "", stub.CountTokens(request, timeout=timeout)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())  # never admitted
        return err.code(), err.details(), None


@pytest.fixture(scope="module")
def short(start_server):
    """A server whose unset max_new_tokens is 4, so that whatever request random bytes decode to ends soon."""
    return start_server({"defaults": SamplingDefaults(max_new_tokens=4)})


@pytest.fixture(scope="module")
def short_channel(short):
    with grpc.insecure_channel(short.address) as ch:
        yield ch


@pytest.mark.slow
@settings(FUZZ, max_examples=30)
@given(data=st.binary(max_size=64), rpc=st.sampled_from(["Chat", "StreamChat"]))
def test_arbitrary_message_bytes_are_refused_or_answered(short_channel, data, rpc):
    method = short_channel.unary_unary if rpc == "Chat" else short_channel.unary_stream
    invoke = method(f"/chat.v1.ChatService/{rpc}", request_serializer=None, response_deserializer=None)
    try:
        reply = invoke(data, timeout=60)
        if rpc == "StreamChat":
            list(reply)
        event("OK")
    except grpc.RpcError as err:
        assert err.code() in EXPECTED, (err.code(), err.details())
        event(err.code().name)


@pytest.mark.parametrize("rpc", ["Chat", "StreamChat", "CountTokens"])
def test_undecodable_message_is_invalid_argument(channel, rpc):
    method = channel.unary_stream if rpc == "StreamChat" else channel.unary_unary
    invoke = method(f"/chat.v1.ChatService/{rpc}", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        reply = invoke(b"\x0a\xff\xff\xff\xff\x0f", timeout=5)  # field 1 claims a length far past the end
        if rpc == "StreamChat":
            list(reply)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith("request: not a valid message")


def _frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GARBAGE = {
    "random bytes": random.Random(7).randbytes(4096),
    "HTTP/1.1": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "TLS hello to a plaintext port": bytes.fromhex("16030100a5010000a10303") + random.Random(1).randbytes(160),
    "preface then junk": PREFACE + random.Random(2).randbytes(512),
    "frame claiming 16 MB": PREFACE + _frame(0x4, 0, 0, b"") + _frame(0x0, 0, 1, b"x" * 10, length=0xFFFFFF),
    "headers on stream 0": PREFACE + _frame(0x4, 0, 0, b"") + _frame(0x1, 0x4, 0, b"\xff" * 32),
    "bad HPACK": PREFACE + _frame(0x4, 0, 0, b"") + _frame(0x1, 0x5, 1, b"\xff\xff\xff\xff\xff\xff"),
    "zeros": b"\x00" * 65536,
    "half a preface": PREFACE[:10],
}


@pytest.mark.slow
def test_raw_garbage_on_the_port_leaves_the_server_serving(server, channel, client):
    for name, payload in GARBAGE.items():
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            try:
                sock.sendall(payload)
                sock.settimeout(1.0)
                sock.recv(65536)  # whatever the server says (GOAWAY, nothing) before it closes
            except (TimeoutError, ConnectionError, OSError):
                pass
        assert serving(channel), name
    text, _ = client.chat("What is the capital of France?", temperature=0.0, max_new_tokens=8)
    assert "Paris" in text


def test_server_is_serving_and_idle_after_the_fuzzing(server, channel):
    assert serving(channel)
    stats = server.engine.stats
    import time

    deadline = time.monotonic() + 10
    while (stats.running or stats.waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_tokens == 0
    assert stats.created == stats.released
