"""The OpenAI API's `priority` extension and `usage.prompt_tokens_details.cached_tokens`, on the real routes over
a scripted engine (no model): a priority that is not an integer in range is a 400 naming `priority`, a valid one
reaches GenerationRequest.priority, and the cached prompt tokens of the last chunk are reported in the usage,
streamed or not."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from service.config import ServerConfig
from service.core.frontend import Frontend
from service.core.types import Answer, FinishReason
from service.core.validation import MAX_PRIORITY
from service.http.guard import Guard
from service.http.openai import openai_routes, parse_completion, usage
from tests.support import ScriptedEngine, post_json

CACHED = 4
PATH = "/v1/chat/completions"


def body(**fields) -> dict:
    return {"model": "scripted", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            **fields}


def test_parse_completion_reads_the_priority():
    assert parse_completion(body(priority=-2), "r").chat.priority == -2
    assert parse_completion(body(priority=3.0), "r").chat.priority == 3  # as for every integer field
    assert parse_completion(body(), "r").chat.priority == 0
    assert parse_completion(body(priority=None), "r").chat.priority == 0


def test_the_usage_reports_the_cached_tokens():
    answer = Answer(text="Paris.", history=(), prompt_tokens=9, completion_tokens=2,
                    finish_reason=FinishReason.STOP, model="m", created=0.0, cached_prompt_tokens=7)
    assert usage(answer) == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11,
                             "prompt_tokens_details": {"cached_tokens": 7}}


@pytest.fixture(scope="module")
async def scripted():
    """(port, engine): the OpenAI routes on a free port over a scripted engine."""
    frontend = Frontend(ServerConfig())
    engine = ScriptedEngine(cached_prompt_tokens=CACHED)
    frontend.set_engine(engine)
    app = web.Application()
    app.add_routes(openai_routes(frontend, Guard(token="", body_timeout=5.0, max_body_bytes=1 << 20)))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield runner.addresses[0][1], engine
    await runner.cleanup()
    frontend.close()


REFUSED = [(MAX_PRIORITY + 1, "must be in ["), (-MAX_PRIORITY - 1, "must be in ["), (10**400, "got 1e+400"),
           ("high", "must be an integer, got string"), (True, "must be an integer, got boolean"),
           (1.5, "must be an integer, got number"), ([1], "must be an integer, got array")]


@pytest.mark.parametrize("priority, says", REFUSED, ids=[repr(p)[:12] for p, _ in REFUSED])
async def test_a_bad_priority_is_a_400_naming_it(scripted, priority, says):
    port, engine = scripted
    submitted = len(engine.requests)
    status, answer, _ = await post_json(port, PATH, body(priority=priority), timeout=10)
    error = answer["error"]
    assert status == 400 and error["param"] == "priority" and error["type"] == "invalid_request_error", answer
    assert error["message"].startswith("priority: ") and says in error["message"], error["message"]
    assert len(engine.requests) == submitted


@pytest.mark.parametrize("priority", [-MAX_PRIORITY, -5, 0, 17, MAX_PRIORITY])
async def test_a_valid_priority_reaches_the_engine_and_usage_has_the_cached_tokens(scripted, priority):
    port, engine = scripted
    status, answer, _ = await post_json(port, PATH, body(priority=priority), timeout=10)
    assert status == 200, answer
    assert engine.requests[-1].priority == priority
    assert answer["choices"][0]["message"]["content"] == "Hello there."
    assert answer["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9,
                               "prompt_tokens_details": {"cached_tokens": CACHED}}


async def test_the_streamed_usage_chunk_has_the_cached_tokens(scripted):
    port, engine = scripted
    status, text, _ = await post_json(port, PATH, body(priority=9, stream=True,
                                                       stream_options={"include_usage": True}), timeout=10)
    assert status == 200 and engine.requests[-1].priority == 9
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["prompt_tokens_details"] == {"cached_tokens": CACHED}
