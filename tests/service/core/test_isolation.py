"""One caller never fails another: hostile values are refused at the boundary while other callers' streams run
(and those streams' answers do not change), a row whose own sampling breaks fails alone, and a failed step
fails only the sequences that were in it."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from client.chat_client import AsyncChatClient
from service.config import SamplingDefaults
from service.engine.faults import Faults
from tests.support import post_json, until

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Count from 1 to 20.",
           "List three fruits."]
GREEDY = dict(temperature=0.0, max_new_tokens=40, ignore_eos=True)
SEEDED = dict(temperature=0.8, top_p=0.9, seed=5, max_new_tokens=40, ignore_eos=True)
LONG = "Describe, in careful detail, the history of the harbour town and its ships. " * 3


@pytest.fixture(scope="module")
def faults():
    return Faults()


@pytest.fixture(scope="module")
def iso(start_server, faults):
    # Prompt chunks of 16 tokens, so that a long prompt is computed over several steps and a second one can
    # hold a slot without being in the step.
    return start_server({"defaults": SamplingDefaults(max_new_tokens=48)}, faults=faults, max_batch_size=8,
                        max_queued_requests=16, prefill_chunk_tokens=16)


async def streamed(call) -> tuple[grpc.StatusCode, str]:
    """(status, joined deltas) of one StreamChat call."""
    text = []
    try:
        async for chunk in call:
            text.append(chunk.delta)
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, "".join(text)


def innocents(client) -> list:
    return ([client.stream_chunks(p, **GREEDY) for p in PROMPTS[:3]]
            + [client.stream_chunks(PROMPTS[3], **SEEDED)])


async def settled(server) -> None:
    frontend, stats = server.runtime.frontend, server.engine.stats
    assert await until(lambda: not frontend.active and frontend.admission.active == 0 and stats.running == 0
                       and stats.waiting == 0, timeout=15), stats
    assert stats.kv_tokens == 0 and stats.created == stats.released


HTTP_HOSTILE = [
    ("/v1/chat/completions", {"temperature": 0.8, "top_k": 10**30},
     "top_k", "must be in [0, 49152] (0 means no limit), got 1e+30"),
    ("/v1/chat/completions", b'{"top_p": 1' + b"0" * 400 + b"}", "top_p", "must be a number in range, got one "
     "too large (1e+400)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]},
     "messages[0].content", "not valid Unicode (a lone surrogate at character 3)"),
    ("/v1/chat/completions", {"temperature": 0.5, "repetition_penalty": 10**500}, "repetition_penalty",
     "must be a number in range, got one too large (1e+500)"),
    ("/", {"prompt": "hi \udc80"}, "prompt", "not valid Unicode (a lone surrogate at character 3)"),
    ("/", {"prompt": "hi", "history": [["\ud83d", "hello"]]}, "history[0].user",
     "not valid Unicode (a lone surrogate at character 0)"),
    ("/", {"prompt": "hi", "history": [["hello", "fine \ud83d"]]}, "history[0].assistant",
     "not valid Unicode (a lone surrogate at character 5)"),
    ("/", b'{"prompt": "hi", "temperature": 1' + b"0" * 400 + b"}", "temperature",
     "must be a number in range, got one too large (1e+400)"),
]


def completion_body(fields, model: str) -> bytes | dict:
    """An OpenAI body around `fields`; bytes fields replace its tail (for literals json.dumps cannot write)."""
    base = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    if isinstance(fields, bytes):
        return json.dumps(base).encode()[:-1] + b", " + fields[1:]
    return {**base, **fields}


async def hostile_http(server, path, fields) -> tuple[int, object]:
    body = completion_body(fields, server.engine.loaded.name) if path.startswith("/v1") else fields
    status, answer, _ = await post_json(server.runtime.http.port, path, body)
    return status, answer


async def test_hostile_values_beside_running_streams_get_400s_and_change_no_answer(iso):
    async with AsyncChatClient(iso.address, timeout=120, retry=None) as client:
        alone = await asyncio.gather(*(streamed(call) for call in innocents(client)))
        assert all(code == grpc.StatusCode.OK for code, _ in alone), alone
        beside = [asyncio.ensure_future(streamed(call)) for call in innocents(client)]
        assert await until(lambda: iso.engine.stats.running == 4, timeout=30)
        for path, fields, param, message in HTTP_HOSTILE:
            status, answer = await hostile_http(iso, path, fields)
            assert status == 400, (path, fields, status, answer)
            if path == "/":
                assert answer == {"status": 400, "error": f"{param}: {message}"}
            else:
                assert answer["error"]["param"] == param and answer["error"]["message"] == f"{param}: {message}"
        for top_k in (2**31 - 1, 49153):  # the contract's int32 lets these through; the vocabulary does not
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.chat("Hi", temperature=0.8, top_k=top_k, max_new_tokens=4)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == f"params.top_k: must be in [0, 49152] (0 means no limit), got {top_k}"
        assert iso.engine.stats.running == 4  # nothing above touched the running batch
        assert await asyncio.gather(*beside) == alone
    await settled(iso)


async def test_a_row_whose_sampling_breaks_fails_alone(iso, faults):
    stats = iso.engine.stats
    samples = []

    def poison(request):  # the poisoned row samples twice, then breaks while the others decode beside it
        if request.request_id == "poison":
            samples.append(1)
            if len(samples) >= 3:
                raise ValueError("injected: Overflow when unpacking long long")

    async with AsyncChatClient(iso.address, timeout=120, retry=None) as client:
        alone = await asyncio.gather(*(streamed(call) for call in innocents(client)))
        failed_steps, failed_rows = stats.failed_steps, stats.failed_rows
        faults.sample = poison
        try:
            beside = [asyncio.ensure_future(streamed(call)) for call in innocents(client)]
            assert await until(lambda: stats.running == 4, timeout=30)
            bad = await streamed(client.stream_chunks(PROMPTS[0], request_id="poison", **GREEDY))
            together = await asyncio.gather(*beside)
        finally:
            faults.sample = None
    assert bad == (grpc.StatusCode.INTERNAL,
                   "generating this answer failed: ValueError: injected: Overflow when unpacking long long")
    assert together == alone  # greedy and seeded neighbours: the same text as without the bad row
    assert stats.failed_rows == failed_rows + 1 and stats.failed_steps == failed_steps
    await settled(iso)


async def test_a_failed_step_fails_only_the_sequences_in_it(iso, faults):
    """Two long prompts arrive together; with 16 prompt tokens a step, the one admitted first fills the steps
    while the other holds a slot and waits its turn. One such step fails: the request in it fails, the other,
    which held a slot but was not in the step, is answered with the text it gets alone."""
    engine, fired = iso.engine, []
    prompts = {"a": LONG + "Now: a.", "b": LONG.replace("harbour", "river") + "Now: b."}

    def fail_a_step_holding_only_one(plan):
        in_step = {c.sequence.request.request_id for c in plan.prefill} | {s.request.request_id for s in plan.decode}
        holding = {s.request.request_id for s in engine.scheduler.running}
        if not fired and holding == {"a", "b"} and len(in_step) == 1:
            fired.extend(in_step)
            raise RuntimeError("injected step fault")

    async with AsyncChatClient(iso.address, timeout=120, retry=None) as client:
        faults.step = fail_a_step_holding_only_one
        try:
            outcomes = await asyncio.gather(*(streamed(client.stream_chunks(prompt, request_id=rid, **GREEDY))
                                              for rid, prompt in prompts.items()))
        finally:
            faults.step = None
        alone = {rid: await streamed(client.stream_chunks(prompt, **GREEDY)) for rid, prompt in prompts.items()}
    assert len(fired) == 1
    failed, = fired
    survivor, = set(prompts) - {failed}
    outcomes = dict(zip(prompts, outcomes, strict=True))
    assert outcomes[failed] == (grpc.StatusCode.INTERNAL, "engine step failed: RuntimeError: injected step fault")
    assert outcomes[survivor] == alone[survivor] and alone[survivor][0] == grpc.StatusCode.OK
    await settled(iso)
