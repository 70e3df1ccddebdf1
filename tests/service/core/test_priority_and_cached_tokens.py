"""The request path's own handling of a request's priority and of the prompt tokens reused from the prefix cache,
without a model: the priority is bounded (INVALID_ARGUMENT naming `priority`) and reaches the engine's
GenerationRequest; a last chunk's cached_prompt_tokens reaches the answer, the record and the metrics."""

from __future__ import annotations

import pytest

from service.config import Limits, SamplingDefaults, ServerConfig
from service.core import validation
from service.core.frontend import Frontend
from service.core.types import ChatInput, RequestedParams
from service.failures import Failure, RequestFailed, Status
from service.metrics import Metrics
from tests.support import ScriptedEngine

MAX = validation.MAX_PRIORITY


def chat(priority: int = 0, prompt: str = "What is the capital of France?") -> ChatInput:
    return ChatInput(prompt=prompt, history=(), system=None, params=RequestedParams(), request_id="r-1",
                     priority=priority)


@pytest.mark.parametrize("priority", [0, -1, 1, -MAX, MAX])
def test_a_priority_in_range_passes_the_checks(priority):
    validation.check_input(chat(priority), Limits(), context_length=2048, vocab_size=1000)


@pytest.mark.parametrize("priority, shown", [(MAX + 1, str(MAX + 1)), (-MAX - 1, str(-MAX - 1)),
                                             (2**31 - 1, str(2**31 - 1)), (-(2**31), str(-(2**31))),
                                             (10**400, "1e+400")])
def test_a_priority_out_of_range_is_invalid_naming_the_field(priority, shown):
    with pytest.raises(RequestFailed) as err:
        validation.check_input(chat(priority), Limits(), context_length=2048, vocab_size=1000)
    failed = err.value
    assert failed.kind is Failure.INVALID and failed.kind.status is Status.INVALID_ARGUMENT
    assert failed.field == "priority"
    assert str(failed) == f"priority: must be in [-{MAX}, {MAX}] (lower runs first), got {shown}"


def test_make_request_carries_the_priority():
    generation = validation.make_request(chat(-7), [1, 2, 3], defaults=SamplingDefaults(), context_length=2048,
                                         deadline=None)
    assert generation.priority == -7
    assert validation.make_request(chat(), [1, 2, 3], defaults=SamplingDefaults(), context_length=2048,
                                   deadline=None).priority == 0


def scripted_frontend(cached: int) -> tuple[Frontend, ScriptedEngine, Metrics]:
    metrics = Metrics()
    frontend = Frontend(ServerConfig(), metrics)
    engine = ScriptedEngine(cached_prompt_tokens=cached)
    frontend.set_engine(engine)
    return frontend, engine, metrics


async def test_the_priority_reaches_the_engine_and_cached_tokens_reach_the_answer_and_metrics():
    frontend, engine, metrics = scripted_frontend(cached=4)
    try:
        answer = await frontend.run(await frontend.start(chat(priority=3), timeout=None))
        again = await frontend.run(await frontend.start(chat(), timeout=None))
    finally:
        frontend.close()
    assert [r.priority for r in engine.requests] == [3, 0]
    assert answer.text == "Hello there." and answer.prompt_tokens == 6
    assert answer.cached_prompt_tokens == again.cached_prompt_tokens == 4
    sample = metrics.registry.get_sample_value
    assert sample("chat_prompt_cached_tokens_total", {"model": "scripted"}) == 8
    assert sample("chat_prompt_tokens_total", {"model": "scripted"}) == 12


async def test_a_priority_out_of_range_never_reaches_the_engine():
    frontend, engine, metrics = scripted_frontend(cached=0)
    try:
        with pytest.raises(RequestFailed) as err:
            await frontend.start(chat(priority=MAX + 1), timeout=None)
    finally:
        frontend.close()
    assert err.value.field == "priority" and engine.requests == [] and frontend.admission.active == 0
    assert metrics.registry.get_sample_value("chat_request_failure_total",
                                             {"model": "scripted", "code": "INVALID_ARGUMENT"}) == 1
