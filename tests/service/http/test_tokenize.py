"""POST /tokenize (vLLM's shape) on the real OpenAI routes over a scripted engine (no model): the count, the
context and the ids of a chat's prompt, the token and the body checked as on every route, a 400 naming the field
in the request's own terms, the model checked as chat completions check it, and nothing submitted. The real
model's count against gRPC's is in tests/service/grpc/test_servicer.py."""

from __future__ import annotations

import pytest
from aiohttp import web

from service.config import ServerConfig
from service.core.frontend import Frontend
from service.http.guard import Guard
from service.http.openai import openai_routes, parse_tokenize
from tests.support import ScriptedEngine, post_json

TOKEN = "tokenize-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONTEXT = 500

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]


@pytest.fixture(scope="module")
async def scripted():
    """(port, engine, frontend): the OpenAI routes, with a token, on a free port over a scripted engine."""
    frontend = Frontend(ServerConfig())
    engine = ScriptedEngine(context=CONTEXT)
    frontend.set_engine(engine)
    app = web.Application(client_max_size=1 << 16)
    app.add_routes(openai_routes(frontend, Guard(token=TOKEN, body_timeout=5.0, max_body_bytes=1 << 16)))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield runner.addresses[0][1], engine, frontend
    await runner.cleanup()
    frontend.close()


def test_parse_tokenize_maps_the_messages_like_a_completion():
    parsed = parse_tokenize({"messages": MESSAGES}, "r")
    assert parsed.model is None and parsed.chat.system == "Be brief."
    assert parsed.chat.prompt == "What is the capital of France?" and len(parsed.chat.history) == 1
    assert parse_tokenize({"model": "m", "messages": MESSAGES}, "r").model == "m"


@pytest.mark.parametrize("body", [{"messages": MESSAGES}, {"model": "scripted", "messages": MESSAGES},
                                  {"model": None, "messages": MESSAGES}])
async def test_the_shape_is_vllms_and_the_count_is_what_a_completion_submits(scripted, body):
    port, engine, _ = scripted
    status, answer, _ = await post_json(port, "/tokenize", body, AUTH, timeout=10)
    assert status == 200, answer
    assert set(answer) == {"count", "max_model_len", "tokens"}
    assert answer["count"] == len(answer["tokens"]) == 11 and answer["max_model_len"] == CONTEXT
    submitted = len(engine.requests)
    status, done, _ = await post_json(port, "/v1/chat/completions", {"model": "scripted", "messages": MESSAGES},
                                      AUTH, timeout=10)
    assert status == 200 and len(engine.requests) == submitted + 1
    assert done["usage"]["prompt_tokens"] == answer["count"]
    assert engine.requests[-1].prompt_ids == answer["tokens"]


async def test_the_token_is_required(scripted):
    port, engine, _ = scripted
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, answer, response_headers = await post_json(port, "/tokenize", {"messages": MESSAGES}, headers,
                                                           timeout=10)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert response_headers["WWW-Authenticate"] == "Bearer"


async def test_another_model_is_not_found(scripted):
    port, _, _ = scripted
    status, answer, _ = await post_json(port, "/tokenize", {"model": "gpt-4o", "messages": MESSAGES}, AUTH,
                                        timeout=10)
    assert status == 404 and answer["error"]["code"] == "model_not_found" and answer["error"]["param"] == "model"


def user(content) -> list[dict]:
    return [{"role": "user", "content": content}]


BAD = [
    ({"messages": user("   ")}, "messages[0].content"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [*MESSAGES[:2], {"role": "assistant", "content": " "}, MESSAGES[3]]}, "messages[2].content"),
    ({"messages": user("\ud800")}, "messages[0].content"),
    ({"messages": user(" ".join(["word"] * CONTEXT))}, "messages[0].content"),  # the whole context: no room
    ({"messages": user("Hi"), "model": 7}, "model"),
    ({"messages": user("Hi"), "max_tokens": 5}, "max_tokens"),
    ({"messages": user("Hi"), "add_special_tokens": True}, "add_special_tokens"),
    ({"prompt": "Hi"}, "prompt"),
    ([1, 2], "body"),
    (b"{not json", "body"),
]


@pytest.mark.parametrize("body, param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
async def test_bad_input_is_a_400_naming_the_field(scripted, body, param):
    port, engine, _ = scripted
    submitted = len(engine.requests)
    status, answer, _ = await post_json(port, "/tokenize", body, AUTH, timeout=10)
    assert status == 400, answer
    error = answer["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert error["message"].startswith(f"{param}: "), error["message"]
    assert len(engine.requests) == submitted


async def test_a_prompt_that_does_not_fit_is_refused_as_the_completion_is(scripted):
    port, _, _ = scripted
    body = {"model": "scripted", "messages": user(" ".join(["word"] * CONTEXT))}
    counted = await post_json(port, "/tokenize", body, AUTH, timeout=10)
    completed = await post_json(port, "/v1/chat/completions", body, AUTH, timeout=10)
    assert counted[0] == completed[0] == 400 and counted[1] == completed[1]


async def test_counting_is_not_admitted(scripted):
    port, engine, frontend = scripted
    frontend.admission.active = frontend.admission.limit
    try:
        refused = await post_json(port, "/v1/chat/completions", {"model": "scripted", "messages": user("Hi")},
                                  AUTH, timeout=10)
        counted = await post_json(port, "/tokenize", {"messages": user("Hi")}, AUTH, timeout=10)
    finally:
        frontend.admission.active = 0
    assert refused[0] == 429 and counted[0] == 200 and counted[1]["count"] == 1
