"""Chat, StreamChat, GetModelInfo and CountTokens through a real server and the real default model."""

from __future__ import annotations

import grpc
import pytest
from chat.v1 import chat_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.models.base import Turn
from tests.support import post_json

GREEDY = {"temperature": 0.0}


def test_chat_knows_the_capital_of_france(client):
    response, history = client.chat("What is the capital of France?", **GREEDY, max_new_tokens=32)
    assert "Paris" in response
    assert history == [("What is the capital of France?", response)]


def test_stream_deltas_join_to_the_chat_answer(client):
    prompt = "Name three colours of the rainbow."
    whole = client.chat_response(prompt, **GREEDY, max_new_tokens=24)
    chunks = list(client.stream_chunks(prompt, **GREEDY, max_new_tokens=24))
    assert "".join(c.delta for c in chunks) == whole.text
    last = chunks[-1]
    assert all(c.finish_reason == chat_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    assert last.finish_reason == whole.finish_reason
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == \
           (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    # the resent prompt finds every full block of the first call's prompt cached (its last token is recomputed)
    assert last.usage.cached_prompt_tokens == (whole.usage.prompt_tokens - 1) // 16 * 16
    assert sum(c.token_count for c in chunks) == whole.usage.completion_tokens
    assert [(t.user, t.assistant) for t in last.history] == [(prompt, whole.text)]
    assert last.model == whole.model == "SmolLM2-135M-Instruct"


def test_finish_reason_and_usage(client):
    capped = client.chat_response("Write a long poem about the ocean.", **GREEDY, max_new_tokens=5)
    assert capped.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert capped.usage.completion_tokens == 5
    assert capped.usage.prompt_tokens > 5
    done = client.chat_response("What is the capital of France?", **GREEDY, max_new_tokens=64)
    assert done.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert 0 < done.usage.completion_tokens < 64
    assert done.created.seconds > 0


def test_max_length_counts_prompt_plus_answer(client):
    probe = client.chat_response("Tell me a story.", **GREEDY, max_new_tokens=1)
    prompt_tokens = probe.usage.prompt_tokens
    capped = client.chat_response("Tell me a story.", **GREEDY, max_length=prompt_tokens + 3)
    assert capped.usage.completion_tokens == 3
    assert capped.finish_reason == chat_pb2.FINISH_REASON_LENGTH


def test_second_turn_sees_the_first(client):
    _, history = client.chat("My name is Ada. Please remember it.", **GREEDY, max_new_tokens=24)
    response, history = client.chat("What is my name?", history, **GREEDY, max_new_tokens=16)
    assert "Ada" in response
    assert len(history) == 2 and history[1] == ("What is my name?", response)


def test_stop_string_ends_the_answer_before_it(client):
    plain, _ = client.chat("Count from 1 to 10, one number per line.", **GREEDY, max_new_tokens=40)
    assert "4" in plain and "5" in plain
    stopped = client.chat_response("Count from 1 to 10, one number per line.", **GREEDY, max_new_tokens=40,
                                   stop=["5"])
    assert stopped.finish_reason == chat_pb2.FINISH_REASON_STOP_SEQUENCE
    assert "5" not in stopped.text
    assert plain.startswith(stopped.text)


def test_seeded_sampling_repeats(client):
    kwargs = {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 1234, "max_new_tokens": 16}
    first, _ = client.chat("Invent a name for a cat.", **kwargs)
    second, _ = client.chat("Invent a name for a cat.", **kwargs)
    assert first == second


def test_model_info(client):
    info = client.model_info()
    assert info.name == "SmolLM2-135M-Instruct"
    assert info.context_length == 8192
    assert info.default_params.max_length == 2048
    assert info.default_params.top_p == pytest.approx(0.7)
    assert info.default_params.temperature == pytest.approx(0.95)
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.weight_format == chat_pb2.WEIGHT_FORMAT_DENSE  # the shared test server runs --quantize none
    assert info.max_batch_size == 16 and info.max_queued_requests == 64
    assert info.kv_cache_tokens > 0


def test_model_info_tells_the_eos_ids_and_the_vocabulary(client, server):
    info = client.model_info()
    loaded = server.engine.loaded
    assert list(info.eos_token_ids) == sorted(loaded.tokenizer.eos_token_ids) and len(info.eos_token_ids) >= 1
    assert info.vocab_size == loaded.vocab_size == 49152
    with pytest.raises(grpc.RpcError):  # the largest top_k is the vocabulary
        client.chat_response("Hi", top_k=info.vocab_size + 1, max_new_tokens=1)


CONVERSATIONS = [
    ({}, "What is the capital of France?"),
    ({"system": "You are a terse geography teacher."}, "What is the capital of France?"),
    ({"history": [("Hi, I am Ada.", "Hello Ada! How can I help you today?")]}, "What is my name?"),
    ({"history": [("Name a colour.", "Blue."), ("And a fruit?", "An apple.")], "system": "Answer in one word."},
     "And an animal?"),
]


@pytest.mark.parametrize("given, prompt", CONVERSATIONS, ids=["plain", "system", "history", "history+system"])
def test_count_tokens_is_the_usage_chat_reports_and_does_no_engine_work(client, server, given, prompt):
    given = dict(given)
    history = given.pop("history", None)
    created = server.engine.stats.created
    counted = client.count_tokens(prompt, history, **given)
    with_ids = client.count_tokens(prompt, history, return_token_ids=True, **given)
    assert server.engine.stats.created == created  # no engine work
    answered = client.chat_response(prompt, history, **GREEDY, max_new_tokens=1, **given)
    assert counted.prompt_tokens == with_ids.prompt_tokens == answered.usage.prompt_tokens
    assert list(counted.token_ids) == []
    tokenizer = server.engine.loaded.tokenizer
    expected = tokenizer.encode_chat(prompt, [Turn(user=u, assistant=a) for u, a in history or []],
                                     given.get("system"))
    assert list(with_ids.token_ids) == expected
    assert counted.context_length == 8192
    assert counted.max_new_tokens == 2048 - counted.prompt_tokens  # under the default max_length


def test_count_tokens_max_new_tokens_is_the_room_chat_allows(client):
    counted = client.count_tokens("Tell me a story.", max_length=40)
    assert counted.max_new_tokens == 40 - counted.prompt_tokens
    capped = client.chat_response("Tell me a story.", **GREEDY, max_length=40, max_new_tokens=500, ignore_eos=True)
    assert capped.usage.completion_tokens == counted.max_new_tokens  # cut to the room, as CountTokens said
    assert capped.finish_reason == chat_pb2.FINISH_REASON_LENGTH


@pytest.mark.parametrize("prompt, params", [("a " * 9000, {}), ("Tell me a story.", {"max_length": 5}),
                                            ("a " * 4000, {"max_new_tokens": 5000}), ("Hi", {"top_p": 0.0})])
def test_count_tokens_refuses_what_chat_refuses_with_the_same_status(client, server, prompt, params):
    created = server.engine.stats.created
    with pytest.raises(grpc.RpcError) as counted:
        client.count_tokens(prompt, **params)
    with pytest.raises(grpc.RpcError) as chatted:
        client.chat_response(prompt, **params)
    assert counted.value.code() == chatted.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert counted.value.details() == chatted.value.details()
    assert server.engine.stats.created == created


async def test_tokenize_over_http_is_count_tokens(server, aclient):
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And a fruit?"}]
    status, body, _ = await post_json(server.runtime.http.port, "/tokenize",
                                      {"model": "SmolLM2-135M-Instruct", "messages": messages}, timeout=30)
    counted = await aclient.count_tokens("And a fruit?", [("Name a colour.", "Blue.")], system="Answer in one word.",
                                         return_token_ids=True)
    assert status == 200, body
    assert body == {"count": counted.prompt_tokens, "max_model_len": 8192, "tokens": list(counted.token_ids)}


@pytest.mark.parametrize("service", ["", "chat.v1.ChatService"])
def test_health_is_serving(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_method_is_unimplemented(channel):
    call = channel.unary_unary("/chat.v1.ChatService/Nope", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        call(b"", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
