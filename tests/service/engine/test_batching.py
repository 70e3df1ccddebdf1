"""Continuous batching through the real server: per-request parameters in one batch, cancellation, stops."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from chat.v1 import chat_pb2

from client.chat_client import AsyncChatClient

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Count from 1 to 20.",
    "Explain photosynthesis in one sentence.",
    "请用中文介绍一下巴黎。",
    "List three fruits.",
]


async def answer(aclient, prompt, **params):
    response = await aclient.chat_response(prompt, temperature=0.0, **params)
    return response.text, response.finish_reason, response.usage.completion_tokens


async def test_concurrent_requests_match_their_solo_answers(aclient, server):
    lengths = [12, 40, 33, 24, 48, 20]
    stops = [[], [], ["15"], [], [], ["3."]]
    penalties = [1.0, 1.0, 1.0, 1.3, 1.0, 1.0]
    requests = [dict(max_new_tokens=n, stop=s, repetition_penalty=r)
                for n, s, r in zip(lengths, stops, penalties, strict=True)]
    alone = [await answer(aclient, p, **kw) for p, kw in zip(PROMPTS, requests, strict=True)]
    steps_before = server.engine.stats.steps
    together = await asyncio.gather(*(answer(aclient, p, **kw) for p, kw in zip(PROMPTS, requests, strict=True)))
    assert together == alone
    # They really shared steps: far fewer decode steps than tokens generated.
    tokens = sum(n for _, _, n in together)
    assert server.engine.stats.steps - steps_before < 0.6 * tokens


async def test_sampled_and_greedy_requests_share_a_batch(aclient):
    greedy = aclient.chat_response("Write a haiku about the sea.", temperature=0.0, max_new_tokens=30)
    sampled = [aclient.chat_response("Write a haiku about the sea.", temperature=1.0, top_p=0.9, seed=s,
                                     max_new_tokens=30) for s in range(3)]
    results = await asyncio.gather(greedy, *sampled)
    solo = await aclient.chat_response("Write a haiku about the sea.", temperature=0.0, max_new_tokens=30)
    assert results[0].text == solo.text
    assert all(r.usage.completion_tokens > 0 for r in results)


async def test_cancelled_stream_leaves_the_batch_and_others_finish(aclient, server):
    long = dict(temperature=0.0, max_new_tokens=200, ignore_eos=True)
    others = [asyncio.ensure_future(aclient.chat_response(p, temperature=0.0, max_new_tokens=40,
                                                          ignore_eos=True)) for p in PROMPTS[:3]]
    call = aclient.stream_chunks("Tell me a very long story about dragons.", **long)
    received = 0
    async for chunk in call:
        received += chunk.token_count
        if received >= 5:
            break
    call.cancel()
    results = await asyncio.gather(*others)
    assert [r.usage.completion_tokens for r in results] == [40, 40, 40]
    assert all(r.finish_reason == chat_pb2.FINISH_REASON_LENGTH for r in results)
    for _ in range(100):
        if server.engine.stats.running == 0:
            break
        await asyncio.sleep(0.05)
    stats = server.engine.stats
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_tokens == 0
    assert stats.created == stats.released


async def test_stop_string_across_a_token_boundary(aclient):
    free = await aclient.chat_response("Count from 1 to 20.", temperature=0.0,
                                       max_new_tokens=60)
    text = free.text
    assert "7. 7\n8" in text
    stopped = await aclient.chat_response("Count from 1 to 20.", temperature=0.0,
                                          max_new_tokens=60, stop=["7. 7\n8"])
    assert stopped.finish_reason == chat_pb2.FINISH_REASON_STOP_SEQUENCE
    assert stopped.text == text[: text.index("7. 7\n8")].strip()
    chunks = [c async for c in aclient.stream_chunks("Count from 1 to 20.",
                                                     temperature=0.0, max_new_tokens=60, stop=["7. 7\n8"])]
    assert "".join(c.delta for c in chunks) == stopped.text


async def test_deadline_mid_generation_stops_the_row(aclient, server):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await aclient.chat_response("Tell me a very long story.", temperature=0.0, max_new_tokens=2000,
                                    ignore_eos=True, timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if server.engine.stats.running == 0:
            break
        await asyncio.sleep(0.05)
    assert server.engine.stats.running == 0


async def test_next_turn_reuses_the_conversation_prefix(aclient, server, start_server):
    history = [(f"Tell me fact {n} about the moon.", f"Fact {n}: the moon is {n * 1000} km from a story.")
               for n in range(1, 9)]
    first = await aclient.chat_response("Which fact was the largest?", history, temperature=0.0, max_new_tokens=8)
    stats = server.engine.stats
    hits, reused = stats.prefix_hits, stats.reused_tokens
    follow = history + [("Which fact was the largest?", first.text)]
    second = await aclient.chat_response("And the smallest?", follow, temperature=0.0, max_new_tokens=8)
    assert stats.prefix_hits == hits + 1
    # Everything up to the new question was reused, not recomputed.
    assert stats.reused_tokens - reused >= first.usage.prompt_tokens
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # Reuse doesn't change the answer: the same turn on a server that keeps no prefixes gives the same text.
    fresh = start_server(prefix_cache_tokens=0)
    async with AsyncChatClient(fresh.address, timeout=120) as fresh_client:
        again = await fresh_client.chat_response("And the smallest?", follow, temperature=0.0, max_new_tokens=8)
    assert fresh.engine.stats.prefix_hits == 0 and again.text == second.text
