"""The callers' sampling set on the OpenAI-style API, driven by the official `openai` package against the session
server: response_format (json_schema, json_object) and vLLM's structured_outputs answers that validate, logprobs
in OpenAI's shape equal to gRPC's, n answers equal to the seeded solo answers (streamed with their index),
logit_bias with string keys, the penalties and the extensions giving gRPC's answers, and stop_reason."""

from __future__ import annotations

import json
import math
import re

import jsonschema
import openai
import pytest
from chat.v1 import chat_pb2, chat_pb2_grpc

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "maxLength": 20},
                         "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
                         "tags": {"type": "array", "items": {"enum": ["big", "old", "coastal"]}, "maxItems": 3}},
          "required": ["city", "population", "tags"], "additionalProperties": False}
PLACE = r"[A-Z][a-z]{2,9}, [A-Z][a-z]{2,9}"
QUESTION = [{"role": "user", "content": "Describe Paris as JSON."}]


@pytest.fixture(scope="module")
def api(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.runtime.http.port}/v1", api_key="unused",
                         max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.engine.loaded.name


@pytest.fixture(scope="module")
def stub(channel):
    return chat_pb2_grpc.ChatServiceStub(channel)


def streamed(api, **kwargs) -> tuple[dict[int, str], dict[int, str], list]:
    """({index: text}, {index: finish_reason}, [logprob entries of index 0]) of a streamed completion."""
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    logprobs: list = []
    for chunk in api.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
            if choice.logprobs and choice.index == 0:
                logprobs += choice.logprobs.content
    return texts, finishes, logprobs


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_response_format_json_schema_validates(api, model, stream, temperature):
    kwargs = dict(model=model, messages=QUESTION, max_tokens=120, temperature=temperature, seed=1,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}})
    if stream:
        texts, finishes, _ = streamed(api, **kwargs)
        text, finish = texts[0], finishes[0]
    else:
        choice = api.chat.completions.create(**kwargs).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_response_format_json_object(api, model):
    choice = api.chat.completions.create(model=model, messages=[{"role": "user", "content": "A person as JSON."}],
                                         max_tokens=200, temperature=0.0, frequency_penalty=0.5,
                                         response_format={"type": "json_object"}).choices[0]
    assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content), dict)


def test_response_format_text_is_todays_answer(api, model):
    plain = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0.0)
    text = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=12, temperature=0.0,
                                       response_format={"type": "text"})
    assert text.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize("kind, value, check", [
    ("json", SCHEMA, lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None),
    ("json", json.dumps(SCHEMA), lambda text: jsonschema.validate(json.loads(text), SCHEMA) is None),
    ("regex", PLACE, lambda text: re.fullmatch(PLACE, text)),
    ("choice", ["Paris", "Rome", "Madrid"], lambda text: text in ("Paris", "Rome", "Madrid")),
    ("grammar", 'start: WORD (" " WORD)~1..3 "."\nWORD: /[a-z]{1,8}/',
     lambda text: re.fullmatch(r"[a-z]{1,8}( [a-z]{1,8}){1,3}\.", text)),
    ("json_object", True, lambda text: isinstance(json.loads(text), dict)),
])
def test_structured_outputs_answers_match(api, model, kind, value, check):
    choice = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=150, temperature=0.0,
                                         extra_body={"structured_outputs": {kind: value}}).choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert check(choice.message.content), choice.message.content


def test_logprobs_in_openais_shape_equal_grpcs(api, model, stub):
    completion = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0.0,
                                             logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    reply = stub.Chat(chat_pb2.ChatRequest(prompt=QUESTION[0]["content"], params=chat_pb2.SamplingParams(
        max_new_tokens=8, temperature=0.0, top_logprobs=3)), timeout=120)
    assert len(content) == len(reply.tokens) == completion.usage.completion_tokens
    for entry, token in zip(content, reply.tokens, strict=True):
        assert bytes(entry.bytes) == token.bytes and entry.token == token.text
        assert math.isclose(entry.logprob, token.logprob, abs_tol=1e-5)
        assert [t.token for t in entry.top_logprobs] == [t.text for t in token.top]
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the chosen token is the most likely
    without_top = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=3, temperature=0.0,
                                              logprobs=True).choices[0].logprobs.content
    assert all(entry.top_logprobs == [] for entry in without_top)
    assert api.chat.completions.create(model=model, messages=QUESTION, max_tokens=3).choices[0].logprobs is None


def test_streamed_logprobs_are_the_completions(api, model):
    kwargs = dict(model=model, messages=QUESTION, max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=2)
    _, _, entries = streamed(api, **kwargs)
    content = api.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert [(e.token, round(e.logprob, 5)) for e in entries] == [(e.token, round(e.logprob, 5)) for e in content]


def test_n_answers_are_the_seeded_solo_answers_and_stream_with_their_index(api, model):
    kwargs = dict(model=model, messages=QUESTION, max_tokens=12, temperature=1.0)
    completion = api.chat.completions.create(n=3, seed=9, **kwargs)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    solo = [api.chat.completions.create(seed=9 + i, **kwargs).choices[0].message.content for i in range(3)]
    assert [c.message.content for c in completion.choices] == solo
    texts, finishes, _ = streamed(api, n=3, seed=9, **kwargs)
    assert sorted(texts) == sorted(finishes) == [0, 1, 2]
    assert [texts[i].strip() for i in range(3)] == solo


def test_logit_bias_with_string_keys(api, model, server):
    forced = server.engine.loaded.tokenizer.encode_text(" apple")[0]
    completion = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=3, temperature=0.0,
                                             logit_bias={str(forced): 100})
    assert completion.choices[0].message.content == "apple apple apple"


def test_penalties_and_extensions_give_grpcs_answers(api, model, stub, server):
    eos = min(server.engine.loaded.tokenizer.eos_token_ids)
    completion = api.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=20, temperature=0.7, seed=4, presence_penalty=0.8,
        frequency_penalty=0.4, extra_body={"min_p": 0.05, "min_tokens": 5, "stop_token_ids": [eos]})
    reply = stub.Chat(chat_pb2.ChatRequest(prompt=QUESTION[0]["content"], params=chat_pb2.SamplingParams(
        max_new_tokens=20, temperature=0.7, seed=4, presence_penalty=0.8, frequency_penalty=0.4, min_p=0.05,
        min_new_tokens=5, stop_token_ids=[eos])), timeout=120)
    assert completion.choices[0].message.content == reply.text
    assert completion.usage.completion_tokens == reply.usage.completion_tokens >= 5


def test_stop_reason_names_the_stop_that_matched(api, model):
    free = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=20, temperature=0.0)
    word = free.choices[0].message.content.split()[2]
    stopped = api.chat.completions.create(model=model, messages=QUESTION, max_tokens=20, temperature=0.0,
                                          stop=["qqq", word]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.model_extra["stop_reason"] == word
    assert free.choices[0].model_extra["stop_reason"] is None
