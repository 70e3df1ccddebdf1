"""Bad input gets INVALID_ARGUMENT naming the field, never reaches the engine, and the server goes on."""

from __future__ import annotations

import logging

import grpc
import pytest
from chat.v1 import chat_pb2, chat_pb2_grpc

import service.core.frontend

NAN = float("nan")

CASES = {
    "empty prompt": ({"prompt": ""}, "prompt"),
    "whitespace prompt": ({"prompt": "  \n\t"}, "prompt"),
    "negative temperature": ({"temperature": -1.0}, "params.temperature"),
    "NaN temperature": ({"temperature": NAN}, "params.temperature"),
    "infinite temperature": ({"temperature": float("inf")}, "params.temperature"),
    "tiny temperature": ({"temperature": 1e-9}, "params.temperature"),
    "top_p zero": ({"top_p": 0.0}, "params.top_p"),
    "top_p above one": ({"top_p": 1.0001}, "params.top_p"),
    "top_p NaN": ({"top_p": NAN}, "params.top_p"),
    "negative top_k": ({"top_k": -1}, "params.top_k"),
    "zero max_new_tokens": ({"max_new_tokens": 0}, "params.max_new_tokens"),
    "negative max_new_tokens": ({"max_new_tokens": -5}, "params.max_new_tokens"),
    "huge max_new_tokens": ({"max_new_tokens": 2**31 - 1}, "params.max_new_tokens"),  # int32: 2**31 can't be sent
    "most negative max_new_tokens": ({"max_new_tokens": -(2**31)}, "params.max_new_tokens"),
    "max_new_tokens the whole context": ({"max_new_tokens": 8192}, "params.max_new_tokens"),
    "temperature above the maximum": ({"temperature": 101.0}, "params.temperature"),
    "most negative top_k": ({"top_k": -(2**31)}, "params.top_k"),
    "top_k beyond the vocabulary": ({"top_k": 49153}, "params.top_k"),
    "largest int32 top_k": ({"top_k": 2**31 - 1}, "params.top_k"),
    "NaN repetition_penalty": ({"repetition_penalty": NAN}, "params.repetition_penalty"),
    "max_length of one": ({"max_length": 1}, "params.max_length"),
    "max_length beyond context": ({"max_length": 10**6}, "params.max_length"),
    "negative repetition_penalty": ({"repetition_penalty": -1.0}, "params.repetition_penalty"),
    "prompt longer than context": ({"prompt": "word " * 9000}, "prompt"),
    "prompt plus max_new_tokens over context": ({"prompt": "word " * 4000, "max_new_tokens": 6000},
                                                "params.max_new_tokens"),
    "prompt over max_length": ({"prompt": "word " * 200, "max_length": 100}, "prompt"),
    "too many stop strings": ({"stop": ["x"] * 9}, "params.stop"),
    "too long stop string": ({"stop": ["x" * 65]}, "params.stop[0]"),
    "empty stop string": ({"stop": [""]}, "params.stop[0]"),
    "history with empty user": ({"history": [("", "hi")]}, "history[0].user"),
    "history with empty answer": ({"history": [("hi", " ")]}, "history[0].assistant"),
    "later history turn empty": ({"history": [("hi", "hello"), ("\n", "ok")]}, "history[1].user"),
    "too many history turns": ({"history": [("hi", "hello")] * 257}, "history"),
    "whitespace system": ({"system": " \t"}, "system"),
    "empty system": ({"system": ""}, "system"),
    "oversized prompt": ({"prompt": "x" * 100_001}, "prompt"),
    # the callers' sampling set (issue 19)
    "min_p above one": ({"min_p": 1.5}, "params.min_p"),
    "NaN min_p": ({"min_p": NAN}, "params.min_p"),
    "presence_penalty above two": ({"presence_penalty": 2.5}, "params.presence_penalty"),
    "infinite frequency_penalty": ({"frequency_penalty": float("-inf")}, "params.frequency_penalty"),
    "logit_bias id past the vocabulary": ({"logit_bias": {49152: 1.0}}, "params.logit_bias[49152]"),
    "negative logit_bias id": ({"logit_bias": {-1: 1.0}}, "params.logit_bias[-1]"),
    "logit_bias over 100": ({"logit_bias": {5: 100.5}}, "params.logit_bias[5]"),
    "NaN logit_bias": ({"logit_bias": {5: NAN}}, "params.logit_bias[5]"),
    "too many logit_bias entries": ({"logit_bias": {i: 1.0 for i in range(1025)}}, "params.logit_bias"),
    "negative stop_token_id": ({"stop_token_ids": [3, -1]}, "params.stop_token_ids[1]"),
    "stop_token_id past the vocabulary": ({"stop_token_ids": [2**31 - 1]}, "params.stop_token_ids[0]"),
    "too many stop_token_ids": ({"stop_token_ids": [1] * 65}, "params.stop_token_ids"),
    "negative min_new_tokens": ({"min_new_tokens": -1}, "params.min_new_tokens"),
    "min_new_tokens over max_new_tokens": ({"min_new_tokens": 10, "max_new_tokens": 5}, "params.min_new_tokens"),
    "min_new_tokens the whole context": ({"min_new_tokens": 8192}, "params.min_new_tokens"),
    "zero n": ({"n": 0}, "params.n"),
    "n over --max-n": ({"n": 9}, "params.n"),
    "most negative n": ({"n": -(2**31)}, "params.n"),
    "top_logprobs over 20": ({"top_logprobs": 21}, "params.top_logprobs"),
    "negative top_logprobs": ({"top_logprobs": -1}, "params.top_logprobs"),
}


def make_request(prompt="Hello", history=(), system=None, stop=(), **params) -> chat_pb2.ChatRequest:
    request = chat_pb2.ChatRequest(
        prompt=prompt,
        history=[chat_pb2.Turn(user=u, assistant=a) for u, a in history],
        params=chat_pb2.SamplingParams(stop=list(stop), **params),
    )
    if system is not None:
        request.system = system
    return request


@pytest.mark.parametrize("rpc", ["Chat", "StreamChat"])
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_invalid_argument(server, channel, rpc, name):
    fields, field_name = CASES[name]
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    created = server.engine.stats.created
    with pytest.raises(grpc.RpcError) as err:
        reply = getattr(stub, rpc)(make_request(**fields), timeout=30)
        if rpc == "StreamChat":
            list(reply)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(field_name + ":"), err.value.details()
    assert server.engine.stats.created == created  # nothing reached the engine


def test_server_answers_after_bad_input(client, channel):
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    for fields, _ in CASES.values():
        with pytest.raises(grpc.RpcError):
            stub.Chat(make_request(**fields), timeout=30)
    response, _ = client.chat("What is the capital of France?", temperature=0.0, max_new_tokens=16)
    assert "Paris" in response


def test_int32_fields_cannot_carry_2_to_the_31():
    """max_new_tokens (and max_length, top_k) are int32 in the contract: 2**31 is refused by the client's own
    protobuf library before anything is sent, and 2**31 - 1, the largest that can be sent, is INVALID_ARGUMENT
    (see CASES)."""
    with pytest.raises(ValueError):
        chat_pb2.SamplingParams(max_new_tokens=2**31)
    params = chat_pb2.SamplingParams()
    with pytest.raises(ValueError):
        params.max_new_tokens = 2**31
    with pytest.raises(ValueError):
        params.top_k = -(2**31) - 1


@pytest.mark.parametrize("rpc", ["Chat", "StreamChat"])
def test_message_over_the_size_limit_is_resource_exhausted(server, channel, rpc):
    limit = server.config.limits.max_message_bytes
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    created = server.engine.stats.created
    with pytest.raises(grpc.RpcError) as err:
        reply = getattr(stub, rpc)(make_request(prompt="x" * (limit + 1)), timeout=30)
        if rpc == "StreamChat":
            list(reply)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert server.engine.stats.created == created


@pytest.mark.parametrize("rpc", ["Chat", "StreamChat"])
def test_unexpected_exception_is_internal_and_logged(server, channel, monkeypatch, caplog, rpc):
    """A bug in a handler reaches the caller as INTERNAL (never UNKNOWN) and the log has its traceback."""

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in validation")

    monkeypatch.setattr(service.core.frontend.validation, "encode_prompt", broken)
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    with caplog.at_level(logging.ERROR, logger="service.grpc.interceptors"), pytest.raises(grpc.RpcError) as err:
        reply = getattr(stub, rpc)(make_request(), timeout=30)
        if rpc == "StreamChat":
            list(reply)
    assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()
    assert f"/chat.v1.ChatService/{rpc}" in err.value.details() and "RuntimeError" in err.value.details()
    assert "a bug in validation" not in err.value.details()  # internals stay in the log
    assert "Traceback" in caplog.text and "a bug in validation" in caplog.text
    assert server.runtime.frontend.admission.active == 0
