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
