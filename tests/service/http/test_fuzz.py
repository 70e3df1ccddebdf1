"""Hostile JSON against the HTTP APIs of a running server, as test_fuzz.py does for gRPC: every JSON type in every
field of POST / and /v1/chat/completions, escaped lone surrogates, integer literals hundreds of digits long,
NaN / Infinity spellings, deep nesting and huge arrays. Every answer is a 200 or a 4xx in the API's JSON shape
naming the field (never a 500), and the server answers normally afterwards. Derandomized: a failure on CI
replays the same way here (CHAT_FUZZ_EXAMPLES sets the example count)."""

from __future__ import annotations

import http.client
import json
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service.config import SamplingDefaults

pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=int(os.environ.get("CHAT_FUZZ_EXAMPLES", "150")) // 2, deadline=None, database=None,
                derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Literals json.dumps would not write: the strategies put a marker string in their place, `encode` swaps it in.
LITERALS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "-" + "9" * 300, "1.5e-400",
            "[" * 2000 + "]" * 2000, "[" + ",".join(["0"] * 20_000) + "]", '"' + "x" * 5000 + '"']
MARK = "\x00literal:"

ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12)  # surrogates too
SURROGATES = st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
LEAF = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(10**300, 10**400)
        | st.floats(allow_nan=False, allow_infinity=False) | ANY_TEXT | SURROGATES.map(lambda s: f"hi {s}")
        | st.sampled_from(LITERALS).map(lambda lit: MARK + lit))
ANY_JSON = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
                        max_leaves=12)


def mostly(valid, hostile=ANY_JSON):
    """Usually a valid value, sometimes any JSON at all, so that whole requests are often valid too."""
    return st.one_of(*[valid] * 7, hostile)


WORDS = st.text(alphabet=st.characters(exclude_categories=("Cs", "Cc", "Z")), min_size=1, max_size=20)
TEXTS = WORDS | ANY_TEXT | SURROGATES


def encode(body) -> bytes:
    text = json.dumps(body)
    for literal in LITERALS:
        text = text.replace(json.dumps(MARK + literal), literal)
    return text.encode()


API_FIELDS = {
    "prompt": mostly(WORDS, TEXTS | ANY_JSON),
    "history": mostly(st.lists(st.tuples(WORDS, WORDS).map(list), max_size=2), st.lists(st.lists(TEXTS), max_size=3)),
    "max_length": mostly(st.integers(60, 120)),
    "top_p": mostly(st.floats(0.1, 1.0)),
    "temperature": mostly(st.sampled_from([0.0, 0.5])),
}


@st.composite
def api_bodies(draw):
    body = draw(st.fixed_dictionaries({}, optional=API_FIELDS))
    if draw(st.booleans()):
        body.setdefault("prompt", draw(WORDS))
    if draw(st.integers(0, 9)) == 0:
        return draw(ANY_JSON)  # not even an object
    return body


def messages():
    message = st.fixed_dictionaries({"role": mostly(st.sampled_from(["user", "system", "assistant", "developer"])),
                                     "content": mostly(WORDS, TEXTS | ANY_JSON)},
                                    optional={"name": ANY_JSON, "tool_calls": ANY_JSON})
    return mostly(st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": WORDS}), min_size=1,
                           max_size=1), st.lists(message | ANY_JSON, max_size=4))


OPENAI_FIELDS = {
    "messages": messages(),
    "max_tokens": mostly(st.integers(1, 4)),
    "max_completion_tokens": mostly(st.integers(1, 4)),
    "temperature": mostly(st.sampled_from([0.0, 0.7])),
    "top_p": mostly(st.floats(0.1, 1.0)),
    "top_k": mostly(st.integers(0, 50)),
    "repetition_penalty": mostly(st.floats(0.5, 2.0)),
    "seed": mostly(st.integers(0, 2**64 - 1)),
    "stop": mostly(st.lists(WORDS, max_size=2) | WORDS),
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.just({"include_usage": True})),
    "user": mostly(WORDS),
    # the callers' sampling set (issue 19)
    "n": mostly(st.integers(1, 2)),
    "logprobs": mostly(st.booleans()),
    "top_logprobs": mostly(st.integers(0, 5)),
    "presence_penalty": mostly(st.floats(-2.0, 2.0)),
    "frequency_penalty": mostly(st.floats(-2.0, 2.0)),
    "logit_bias": mostly(st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=3)),
    "min_p": mostly(st.floats(0.0, 1.0)),
    "min_tokens": mostly(st.integers(0, 2)),
    "stop_token_ids": mostly(st.lists(st.integers(0, 49151), max_size=2)),
    "response_format": mostly(st.sampled_from([
        {"type": "text"}, {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}])
        | st.builds(lambda schema: {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, ANY_JSON)),
    "structured_outputs": mostly(st.sampled_from([{"regex": "[a-z]+"}, {"choice": ["a", "b"]},
                                                  {"grammar": 'start: "x"+'}, {"json": {"type": "array"}}])
                                 | st.dictionaries(st.sampled_from(["json", "regex", "choice", "grammar", "json_object",
                                                                    "other"]), ANY_JSON, max_size=2)),
}
# Parameters the server refuses unless at their unused value, and one it does not know: one of them, sometimes.
OTHER_FIELDS = ["tools", "audio", "made_up"]


@st.composite
def openai_bodies(draw, model: str):
    body = draw(st.fixed_dictionaries({"model": mostly(st.just(model))}, optional=OPENAI_FIELDS))
    if "messages" not in body or draw(st.booleans()):
        body["messages"] = [{"role": "user", "content": draw(WORDS)}]
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 2
    if draw(st.integers(0, 4)) == 0:
        body[draw(st.sampled_from(OTHER_FIELDS))] = draw(ANY_JSON)
    if draw(st.integers(0, 9)) == 0:
        return draw(ANY_JSON)
    return body


@pytest.fixture(scope="module")
def fuzzed(start_server):
    return start_server({"defaults": SamplingDefaults(max_new_tokens=4)}, max_batch_size=4, max_queued_requests=8)


def post(port: int, path: str, data: bytes) -> tuple[int, object]:
    """(status, JSON body) of one POST; the body must be JSON whatever the status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    if response.getheader("Content-Type", "").startswith("text/event-stream"):
        assert response.status == 200 and raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
        return response.status, None
    return response.status, json.loads(raw)


def field_root(name: str) -> str:
    return name.split("[")[0].split(".")[0]


@FUZZ
@given(body=api_bodies())
def test_post_root_answers_or_names_the_field(fuzzed, body):
    status, answer = post(fuzzed.runtime.http.port, "/", encode(body))
    event(f"{status} {answer['error'].split(':')[0]}" if status != 200 else "200")
    assert status in (200, 400, 413), (status, answer)
    if status == 200:
        assert isinstance(answer["response"], str) and answer["status"] == 200
    else:
        assert answer["status"] == status
        assert field_root(answer["error"].split(":")[0]) in (*API_FIELDS, "body"), answer


@FUZZ
@given(data=st.data())
def test_chat_completions_answers_or_names_the_field(fuzzed, data):
    body = data.draw(openai_bodies(fuzzed.engine.loaded.name))
    status, answer = post(fuzzed.runtime.http.port, "/v1/chat/completions", encode(body))
    error = answer["error"] if status != 200 and answer is not None else None
    event(f"{status} {error['param']}" if error else str(status))
    assert status in (200, 400, 404, 413), (status, answer)
    if error is not None:
        assert error["type"] == "invalid_request_error" and error["message"], answer
        known = (*OPENAI_FIELDS, *OTHER_FIELDS, "model", "body")
        param = error["param"]
        assert param is not None and (field_root(param) in known or isinstance(body, dict) and param in body), answer


def test_the_server_answers_after_the_fuzzing(fuzzed):
    port = fuzzed.runtime.http.port
    status, answer = post(port, "/", json.dumps({"prompt": "What is the capital of France?", "temperature": 0,
                                                 "max_length": 100}).encode())
    assert status == 200 and answer["response"]
    stats = fuzzed.engine.stats
    assert stats.failed_steps == 0 and stats.failed_rows == 0
