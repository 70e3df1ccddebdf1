"""The OpenAI-compatible API (/v1/chat/completions, /v1/models) driven by the official `openai` package, plus
raw SSE: the same text as gRPC, streamed deltas that join to the answer, usage, finish reasons, errors in
OpenAI's shape, refused parameters, and a client that disconnects mid-stream freeing its row."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import openai
import pytest

from client.chat_client import AsyncChatClient, ChatClient
from service.config import SamplingDefaults
from tests.support import busy, until

pytestmark = pytest.mark.slow

TOKEN = "openai-test-token"


@pytest.fixture(scope="module")
def oa(start_server):
    return start_server({"defaults": SamplingDefaults(max_new_tokens=48)}, max_batch_size=2, max_queued_requests=2)


def api_client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.runtime.http.port}/v1", api_key=key, max_retries=0,
                         timeout=120)


def model_name(server) -> str:
    return server.engine.loaded.name


async def settled(server) -> None:
    frontend, stats = server.runtime.frontend, server.engine.stats
    assert await until(lambda: not frontend.active and frontend.admission.active == 0 and stats.running == 0
                       and stats.waiting == 0, timeout=15), stats


async def raw(server, body, path: str = "/v1/chat/completions"):
    """(status, JSON) of one POST made without the openai package."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{server.runtime.http.port}{path}", data=data) as response:
        return response.status, await response.json(content_type=None)


def test_models_lists_the_served_model(oa):
    client = api_client(oa)
    assert [m.id for m in client.models.list().data] == [model_name(oa)]
    assert client.models.retrieve(model_name(oa)).id == model_name(oa)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_completion_equals_the_grpc_answer_with_its_usage(oa):
    messages = [{"role": "system", "content": "You are a geography teacher."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."},
                {"role": "user", "content": "And of Germany?"}]
    completion = api_client(oa).chat.completions.create(model=model_name(oa), messages=messages, temperature=0,
                                                        max_tokens=32)
    with ChatClient(oa.address) as grpc_client:
        expected = grpc_client.chat_response(
            "And of Germany?", [("What is the capital of France?", "The capital of France is Paris.")],
            system="You are a geography teacher.", temperature=0.0, max_new_tokens=32)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert "Berlin" in expected.text and choice.finish_reason == "stop"
    assert completion.usage.prompt_tokens == expected.usage.prompt_tokens
    assert completion.usage.completion_tokens == expected.usage.completion_tokens
    assert completion.usage.total_tokens == expected.usage.prompt_tokens + expected.usage.completion_tokens
    assert completion.model == model_name(oa) and completion.id.startswith("chatcmpl-")


def test_streamed_deltas_join_to_the_answer_and_usage_comes_last(oa):
    client = api_client(oa)
    ask = {"model": model_name(oa), "messages": [{"role": "user", "content": "Name three colours."}],
           "temperature": 0, "max_completion_tokens": 24}
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1 and "".join(deltas) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    streamed, first = chunks[-1].usage.model_dump(), whole.usage.model_dump()
    cached = streamed.pop("prompt_tokens_details")["cached_tokens"]
    first.pop("prompt_tokens_details")
    assert chunks[-1].choices == [] and streamed == first
    # the resent prompt finds every full block of the first call's prompt cached (its last token is recomputed)
    assert cached == (whole.usage.prompt_tokens - 1) // 16 * 16
    assert all(c.usage is None for c in chunks[:-1])


def test_length_and_stop_finish_reasons(oa):
    client = api_client(oa)
    ask = {"model": model_name(oa), "messages": [{"role": "user", "content": "What is the capital of France?"}],
           "temperature": 0}
    short = client.chat.completions.create(**ask, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    stopped = client.chat.completions.create(**ask, stop=["Paris"], seed=7)
    assert stopped.choices[0].finish_reason == "stop" and "Paris" not in stopped.choices[0].message.content


async def test_sse_ends_with_done(oa):
    body = {"model": model_name(oa), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "stream": True}
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{oa.runtime.http.port}/v1/chat/completions", json=body) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
        events = (await response.text()).split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])


async def test_a_client_that_disconnects_mid_stream_frees_its_row(oa):
    body = {"model": model_name(oa), "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 1000, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"http://127.0.0.1:{oa.runtime.http.port}/v1/chat/completions", json=body)
        for _ in range(5):  # five events: a data line, then the blank line that ends the event
            assert (await response.content.readline()).startswith(b"data: {")
            assert await response.content.readline() == b"\n"
        assert oa.engine.stats.running == 1
        response.close()  # drop the connection mid-answer
    await settled(oa)


async def test_a_full_queue_is_429_in_openai_shape_and_counts_for_grpc_too(oa):
    client = api_client(oa)
    ask = {"model": model_name(oa), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    async with AsyncChatClient(oa.address, timeout=60, retry=None) as grpc_client:
        async with busy(grpc_client, oa.engine, 2):
            with pytest.raises(openai.RateLimitError) as refused:
                await asyncio.to_thread(client.chat.completions.create, **ask)
    assert refused.value.status_code == 429 and refused.value.code == "rate_limit_exceeded"
    assert refused.value.response.headers["Retry-After"] == "1"
    await settled(oa)
    # Two streams over HTTP fill the same admission limit that gRPC calls count against.
    long = {"model": model_name(oa), "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 1000, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as session:
        streams = [await session.post(f"http://127.0.0.1:{oa.runtime.http.port}/v1/chat/completions", json=long)
                   for _ in range(2)]
        assert await until(lambda: oa.runtime.frontend.admission.active == 2)
        with pytest.raises(grpc.RpcError) as grpc_refused:
            ChatClient(oa.address, retry=None).chat("Hi", max_new_tokens=2)
        assert grpc_refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for stream in streams:
            stream.close()
    await settled(oa)


def test_draining_is_503(oa):
    oa.runtime.frontend.admission.drain()
    try:
        with pytest.raises(openai.InternalServerError) as refused:
            api_client(oa).chat.completions.create(model=model_name(oa), messages=[{"role": "user", "content": "Hi"}])
    finally:
        oa.runtime.frontend.admission.reopen()
    assert refused.value.status_code == 503 and refused.value.code == "service_unavailable"


REFUSED = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"audio": {"voice": "alloy"}}, "audio"), ({"modalities": ["text", "audio"]}, "modalities"),
    # the callers' sampling set, given bad values
    ({"n": 0}, "n"), ({"n": 9}, "n"), ({"n": "2"}, "n"), ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"presence_penalty": "x"}, "presence_penalty"),
    ({"logit_bias": {"abc": 1}}, 'logit_bias["abc"]'), ({"logit_bias": {"50256": -101}}, "logit_bias[50256]"),
    ({"logit_bias": {"99999": 1}}, "logit_bias[99999]"), ({"logit_bias": {"5": None}}, "logit_bias[5]"),
    ({"logit_bias": [1]}, "logit_bias"), ({"min_p": 2}, "min_p"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 10, "max_tokens": 4}, "min_tokens"), ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
    ({"stop_token_ids": "2"}, "stop_token_ids"), ({"stop_token_ids": [1, 2.5]}, "stop_token_ids[1]"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "text", "json_schema": {}}}, "response_format.json_schema"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["a", ""]}}, "structured_outputs.choice[1]"),
    ({"structured_outputs": {"choice": "a"}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": "{bad"}}, "structured_outputs.json"),
    ({"structured_outputs": {"grammar": "start: ((("}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "stop": ["x"]}, "stop"),
    ({"structured_outputs": {"regex": "a"}, "min_tokens": 2}, "min_tokens"),
    ({"best_of": 3}, "best_of"), ({"temperature": "hot"}, "temperature"), ({"top_p": "0.5"}, "top_p"),
    ({"temperature": 500}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -5}, "max_completion_tokens"), ({"max_tokens": 5, "max_completion_tokens": 6},
                                                               "max_completion_tokens"),
    ({"seed": -1}, "seed"), ({"stop": 5}, "stop"), ({"stop": ["x"] * 20}, "stop"), ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": {"role": "user"}}, "messages"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a", "audio": {}}]}, "messages[0].audio"),
    ({"model": 7}, "model"),
    ({"temperature": 0.8, "top_k": 10**30}, "top_k"), ({"top_k": 2**31}, "top_k"), ({"seed": 2**64}, "seed"),
    ({"top_p": 10**400}, "top_p"), ({"temperature": -(10**400)}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": "\udfff"}, {"role": "user", "content": "hi"}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]}, "messages[0].content"),
    ({"stop": ["\ud800"]}, "stop[0]"),
]


@pytest.mark.parametrize("change, param", REFUSED, ids=[p for _, p in REFUSED])
async def test_unsupported_or_bad_parameters_are_a_400_naming_them(oa, change, param):
    body = {"model": model_name(oa), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **change}
    status, answer = await raw(oa, body)
    error = answer["error"]
    assert status == 400 and error["type"] == "invalid_request_error" and error["param"] == param, answer
    assert error["message"].startswith(f"{param}: ")


async def test_an_unknown_parameter_with_an_empty_name_is_named_too(oa):
    """Found by the fuzzer: `{"": null}` was refused with `param: null`."""
    body = {"model": model_name(oa), "messages": [{"role": "user", "content": "Hi"}], "": None}
    status, answer = await raw(oa, body)
    assert status == 400 and answer["error"]["param"] == "" and answer["error"]["message"] == 'unknown parameter ""'


async def test_malformed_bodies_are_a_400_and_the_server_keeps_serving(oa):
    for body in (b"{bad", b"[]", b"null", b"\xff", b'{"model": Infinity}'):
        status, answer = await raw(oa, body)
        assert status == 400 and answer["error"]["param"] == "body", (body, answer)
    status, answer = await raw(oa, {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    completion = api_client(oa).chat.completions.create(model=model_name(oa), max_tokens=4,
                                                        messages=[{"role": "user", "content": "Hi"}])
    assert completion.choices[0].message.content


@pytest.fixture(scope="module")
def guarded(start_server):
    return start_server({"defaults": SamplingDefaults(max_new_tokens=8), "auth_token": TOKEN})


def test_the_openai_api_needs_the_token(guarded):
    ask = {"model": model_name(guarded), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with pytest.raises(openai.AuthenticationError):
        api_client(guarded, "wrong").chat.completions.create(**ask)
    with pytest.raises(openai.AuthenticationError):
        api_client(guarded, "wrong").models.list()
    assert api_client(guarded, TOKEN).chat.completions.create(**ask).choices[0].message.content
