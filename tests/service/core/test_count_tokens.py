"""Frontend.count (CountTokens, POST /tokenize) on a scripted engine, without a model: the prompt ids are the ones a
Chat request of the same input submits, the room for the answer is validation.answer_room, the one resolve uses,
every refusal is the one `start` gives, and counting never reaches the engine, the admission count or the
request metrics."""

from __future__ import annotations

import pytest

from service.config import SamplingDefaults, ServerConfig
from service.core import validation
from service.core.frontend import Frontend
from service.core.types import ChatInput, RequestedParams
from service.failures import Failure, RequestFailed
from service.metrics import Metrics
from service.models.base import Turn
from tests.support import ScriptedEngine

CONTEXT = 300
DEFAULTS = SamplingDefaults(max_length=200, max_new_tokens=50)


def chat(prompt: str = "What is the capital of France?", history: tuple[Turn, ...] = (), system: str | None = None,
         **params) -> ChatInput:
    return ChatInput(prompt=prompt, history=history, system=system, params=RequestedParams(**params),
                     request_id="count-1")


@pytest.fixture
def scripted():
    """(frontend, engine, metrics) over a scripted engine with a 300-token context; the server's defaults are
    max_length 200 and max_new_tokens 50, so that the room and the default answer length differ."""
    metrics = Metrics()
    frontend = Frontend(ServerConfig(defaults=DEFAULTS), metrics)
    engine = ScriptedEngine(context=CONTEXT)
    frontend.set_engine(engine)
    yield frontend, engine, metrics
    frontend.close()


CHATS = [
    chat(),
    chat(system="You are terse."),
    chat("And of Italy?", history=(Turn("Capital of France?", "Paris."), Turn("Of Spain?", "Madrid."))),
    chat("And of Italy?", history=(Turn("Capital of France?", "Paris."),), system="Answer in one word."),
]


@pytest.mark.parametrize("given", CHATS, ids=["plain", "system", "history", "history+system"])
async def test_the_count_is_what_chat_submits(scripted, given):
    frontend, engine, _ = scripted
    count = await frontend.count(given)
    await frontend.run(await frontend.start(given, timeout=None))
    submitted = engine.requests[-1]
    assert list(count.prompt_ids) == submitted.prompt_ids
    assert count.prompt_tokens == len(submitted.prompt_ids)
    assert count.context_length == CONTEXT
    assert count.max_new_tokens == DEFAULTS.max_length - count.prompt_tokens  # under the default max_length
    assert submitted.params.max_new_tokens == min(DEFAULTS.max_new_tokens, count.max_new_tokens)


@pytest.mark.parametrize("params", [{}, {"max_length": 20}, {"max_length": 299}, {"max_new_tokens": 7},
                                    {"max_new_tokens": 250}, {"max_length": 30, "max_new_tokens": 3}])
async def test_max_new_tokens_is_the_room_resolve_allows(scripted, params):
    frontend, engine, _ = scripted
    count = await frontend.count(chat(**params))
    room = validation.answer_room(RequestedParams(**params), DEFAULTS, count.prompt_tokens, CONTEXT)
    assert count.max_new_tokens == room
    assert count.max_new_tokens == min(params.get("max_length", DEFAULTS.max_length), CONTEXT) - count.prompt_tokens
    # asking for exactly the room gets it in full; one more is cut to it, as resolve cuts it
    asked = {**params, "max_new_tokens": count.max_new_tokens}
    await frontend.run(await frontend.start(chat(**asked), timeout=None))
    assert engine.requests[-1].params.max_new_tokens == count.max_new_tokens
    over = RequestedParams(**{**params, "max_new_tokens": count.max_new_tokens + 1})
    assert validation.resolve(over, DEFAULTS, count.prompt_tokens, CONTEXT).max_new_tokens == count.max_new_tokens


async def test_a_long_prompt_without_max_length_may_use_the_whole_context(scripted):
    frontend, _, _ = scripted
    count = await frontend.count(chat(" ".join(["word"] * 250)))
    assert count.prompt_tokens == 250 and count.max_new_tokens == CONTEXT - 250


REFUSED = [
    ("prompt", chat(" ".join(["word"] * CONTEXT))),  # the whole context: no room for an answer
    ("prompt", chat(" ".join(["word"] * 30), max_length=30)),
    ("params.max_new_tokens", chat(" ".join(["word"] * 200), max_new_tokens=101)),
    ("prompt", chat("   ")),
    ("history[0].assistant", chat(history=(Turn("Hi", " "),))),
    ("system", chat(system="")),
    ("params.top_p", chat(top_p=0.0)),
    ("params.max_length", chat(max_length=CONTEXT + 1)),
    ("params.top_k", chat(top_k=1001)),
]


@pytest.mark.parametrize("field, given", REFUSED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(REFUSED)])
async def test_a_refusal_is_the_one_chat_gives(scripted, field, given):
    frontend, engine, _ = scripted
    with pytest.raises(RequestFailed) as counted:
        await frontend.count(given)
    with pytest.raises(RequestFailed) as started:
        await frontend.start(given, timeout=None)
    assert counted.value.kind is started.value.kind is Failure.INVALID
    assert counted.value.field == started.value.field == field
    assert str(counted.value) == str(started.value)
    assert engine.requests == []


async def test_counting_does_no_engine_work_is_not_admitted_and_not_recorded(scripted):
    frontend, engine, metrics = scripted
    frontend.admission.active = frontend.admission.limit  # the server is full
    with pytest.raises(RequestFailed) as err:
        await frontend.start(chat(), timeout=None)
    assert err.value.kind is Failure.FULL
    count = await frontend.count(chat())  # counting still answers
    assert count.prompt_tokens == 6
    assert frontend.admission.active == frontend.admission.limit
    assert engine.requests == [] and engine.stats.created == 0 and not frontend.active
    sample = metrics.registry.get_sample_value
    assert sample("chat_prompt_tokens_total", {"model": "scripted"}) in (None, 0)
    assert sample("chat_request_failure_total", {"model": "scripted", "code": "RESOURCE_EXHAUSTED"}) == 1
    with pytest.raises(RequestFailed):
        await frontend.count(chat(top_p=2.0))
    assert sample("chat_request_failure_total", {"model": "scripted", "code": "INVALID_ARGUMENT"}) in (None, 0)


async def test_counting_is_refused_while_loading_and_draining():
    frontend = Frontend(ServerConfig())
    try:
        with pytest.raises(RequestFailed) as err:
            await frontend.count(chat())
        assert err.value.kind is Failure.LOADING
        frontend.set_engine(ScriptedEngine())
        frontend.admission.drain()
        with pytest.raises(RequestFailed) as err:
            await frontend.count(chat())
        assert err.value.kind is Failure.DRAINING
    finally:
        frontend.close()
