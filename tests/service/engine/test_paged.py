"""The paged engine through the real server: requests up to the model's context, preemption that changes no
answer, prefix blocks shared by callers, and the usage that reports them."""

from __future__ import annotations

import asyncio

from chat.v1 import chat_pb2

from client.chat_client import AsyncChatClient

GREEDY = dict(temperature=0.0, ignore_eos=True)
QUESTIONS = ["Name a colour.", "Name a fruit.", "Name a river.", "Name a city."]


async def test_a_request_past_the_old_2048_position_slot_is_answered(aclient, server):
    info = await aclient.model_info()
    assert info.context_length == 8192 == server.engine.max_context
    long = " ".join(f"Line {n}: the harbour keeps its boats." for n in range(260))  # ~2600 tokens
    response = await aclient.chat_response(long + " What does the harbour keep?", max_new_tokens=8, **GREEDY)
    assert response.usage.prompt_tokens > 2048
    assert response.usage.completion_tokens == 8


async def test_preempted_sequences_answer_as_they_would_alone(aclient, start_server):
    """Four streams on a pool of 12 blocks (192 positions) that cannot hold them all: some are preempted and
    recomputed, and every greedy answer equals its answer alone on a pool with room for all."""
    prompts = [f"Write a short story about a {animal}." for animal in ("cat", "dog", "fox", "owl")]
    alone = [(await aclient.chat_response(p, max_new_tokens=60, **GREEDY)).text for p in prompts]
    small = start_server(kv_cache_tokens=192, max_batch_size=4, max_queued_requests=8)
    async with AsyncChatClient(small.address, timeout=300) as client:
        together = await asyncio.gather(*(client.chat_response(p, max_new_tokens=60, **GREEDY) for p in prompts))
    stats = small.engine.stats
    assert stats.preempted > 0
    assert [r.text for r in together] == alone
    assert all(r.usage.completion_tokens == 60 for r in together)
    assert stats.running == stats.waiting == stats.kv_blocks_held == 0
    assert stats.kv_blocks_free == stats.kv_blocks_pool == 12  # every block back in the pool


async def test_callers_sharing_a_system_prompt_share_its_blocks(aclient, start_server):
    """After one warm call, callers with the same long system prompt get its blocks from the cache (usage says
    how many tokens) and the answers a server without prefix caching gives."""
    system = " ".join(f"Rule {n}: answer briefly and politely." for n in range(30))
    warm = await aclient.chat_response("Hello.", system=system, max_new_tokens=4, **GREEDY)
    assert warm.usage.prompt_tokens > 200
    answers = await asyncio.gather(*(aclient.chat_response(q, system=system, max_new_tokens=8, **GREEDY)
                                     for q in QUESTIONS))
    for response in answers:
        cached = response.usage.cached_prompt_tokens
        assert cached % 16 == 0 and response.usage.prompt_tokens - 16 - 32 <= cached < response.usage.prompt_tokens
    plain = start_server(prefix_cache_tokens=0)
    async with AsyncChatClient(plain.address, timeout=120) as client:
        fresh = [await client.chat_response(q, system=system, max_new_tokens=8, **GREEDY) for q in QUESTIONS]
    assert [r.text for r in fresh] == [r.text for r in answers]
    assert all(r.usage.cached_prompt_tokens == 0 for r in fresh)


async def test_priority_reaches_the_scheduler_and_a_request_without_it_runs_at_0(aclient, server):
    stream = aclient.stream_chunks("Count to five.", max_new_tokens=4, priority=-5, **GREEDY)
    chunks = [c async for c in stream]
    assert chunks[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
    response = await aclient.chat_response("Count to five.", max_new_tokens=4, **GREEDY)
    assert response.text == "".join(c.delta for c in chunks)


async def test_in_float32_dense_preempted_and_sharing_sequences_equal_their_solo_answers():
    """The engine alone, float32 with --quantize none: four answers on a pool too small for them (so some are
    preempted and recomputed) and two that share a long system prompt's blocks equal, token for token, what
    each gets alone on the same engine."""
    import torch

    from service.config import Limits
    from service.engine.engine import Engine
    from service.engine.request import GenerationRequest, SamplingParams
    from service.models.loader import load_model
    from service.models.quant.quantize import Quantization

    loaded = load_model("", torch.device("cpu"), torch.float32, Quantization.NONE)
    engine = Engine(loaded, Limits(max_batch_size=4, max_queued_requests=8, kv_cache_tokens=128))
    engine.start()
    params = SamplingParams(max_new_tokens=40, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                            ignore_eos=True)
    system = " ".join(f"Rule {n}: be brief." for n in range(6))

    async def answer(rid: str, prompt: str, system_text: str | None = None) -> str:
        ids = loaded.tokenizer.encode_chat(prompt, (), system_text)
        return "".join([c.text async for c in engine.submit(GenerationRequest(rid, ids, params)).stream()])

    try:
        stories = [f"Tell a story about a {animal}." for animal in ("cat", "dog", "fox", "owl")]
        alone = [await answer(f"solo-{i}", p) for i, p in enumerate(stories)]
        preempted = engine.stats.preempted
        together = await asyncio.gather(*(answer(f"batch-{i}", p) for i, p in enumerate(stories)))
        assert engine.stats.preempted > preempted
        assert together == alone
        first = await answer("system-a", "Name a colour.", system)
        reused = engine.stats.reused_tokens
        second_alone = await answer("system-b", "Name a river.", system)
        assert engine.stats.reused_tokens - reused >= 32  # the system prompt's blocks were shared
        both = await asyncio.gather(answer("system-c", "Name a colour.", system),
                                    answer("system-d", "Name a river.", system))
        assert list(both) == [first, second_alone]
    finally:
        engine.stop()
