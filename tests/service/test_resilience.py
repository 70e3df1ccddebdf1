"""Callers who go away, deadlines, and text integrity under load, on the shared session server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import psutil
import pytest
from chat.v1 import chat_pb2

from service.core.types import FinishReason, GenerationRequest, SamplingParams
from tests.support import until

STORM_PROMPTS = ["What is the capital of France?", "Name a colour.", "Say hello in Spanish.", "What is 3 times 4?"]
STORM_TOKENS = 8


async def settled(server) -> None:
    frontend, stats = server.runtime.frontend, server.engine.stats
    assert await until(lambda: not frontend.active and frontend.admission.active == 0
                       and stats.running == 0 and stats.waiting == 0)


def long_request(engine, prompt: str, **fields) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=500, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                            ignore_eos=True)
    return GenerationRequest("", engine.loaded.tokenizer.encode_chat(prompt, (), None), params, **fields)


async def last_chunk(handle):
    """Read the handle's queue directly until the chunk that ends the request."""
    while True:
        item = await asyncio.wait_for(handle.chunks.get(), 30)
        assert not isinstance(item, Exception), item
        if item.finish_reason != FinishReason.UNSPECIFIED:
            return item


async def test_cancelled_request_leaves_the_batch_within_one_step(server):
    engine = server.engine
    await settled(server)
    handle = engine.submit(long_request(engine, "Tell me a very long story about a lighthouse."))
    received = 0
    while received < 5:
        received += (await asyncio.wait_for(handle.chunks.get(), 30)).token_count
    steps = engine.stats.steps
    handle.cancel()
    last = await last_chunk(handle)
    assert last.finish_reason == FinishReason.CANCELLED
    assert engine.stats.steps - steps <= 1  # at most the step already under way
    assert engine.stats.running == 0 and engine.stats.kv_tokens == 0  # its KV is gone with it


async def test_deadline_mid_generation_stops_within_one_step(server):
    engine = server.engine
    await settled(server)
    dropped = engine.stats.dropped_running
    deadline = time.monotonic() + 0.6
    handle = engine.submit(long_request(engine, "Tell me a very long story about a river.", deadline=deadline))
    await asyncio.sleep(deadline - time.monotonic())
    steps = engine.stats.steps
    last = await last_chunk(handle)
    assert last.finish_reason == FinishReason.CANCELLED and 0 < last.completion_tokens < 500
    assert engine.stats.steps - steps <= 1
    assert engine.stats.dropped_running == dropped + 1
    assert engine.stats.running == 0 and engine.stats.kv_tokens == 0


async def test_streams_are_whole_utf8_characters_for_cjk_and_emoji(aclient):
    """Chinese and emoji answers stream as valid UTF-8 whose deltas join to Chat's text. A small model can emit
    byte tokens that never form a character; those decode to U+FFFD exactly as a one-shot decode would, but a
    delta that is not the last never ends in one (bytes of a character still arriving are held back)."""
    prompts = ["请用中文写一首关于月亮的短诗。", "Reply using only emoji: how do you feel about pizza? 🍕😀"]
    wide = 0
    greedy = {"temperature": 0.0, "max_new_tokens": 40}

    async def both(prompt):
        return await asyncio.gather(aclient.chat_response(prompt, **greedy),
                                    _collect(aclient.stream_chunks(prompt, **greedy)))

    for whole, chunks in await asyncio.gather(*(both(p) for p in prompts)):  # one batch: float32 is batch-exact
        for chunk in chunks:
            chunk.delta.encode("utf-8", errors="strict")  # no lone surrogates
            assert chunk.finish_reason or not chunk.delta.endswith("\ufffd"), [c.delta for c in chunks]
        assert "".join(c.delta for c in chunks) == whole.text
        wide += sum(len(ch.encode()) > 1 for ch in whole.text if ch != "\ufffd")
    assert wide >= 10  # the answers really had multi-byte characters in them


async def _collect(call):
    return [chunk async for chunk in call]


def test_real_tokenizer_pieces_never_split_a_character(server):
    """The default model's byte-level BPE splits CJK and emoji across tokens; fed one token at a time, the
    text stream hands out only whole characters and ends with exactly the one-shot decode."""
    from service.engine.text import TextStream

    tokenizer = server.engine.loaded.tokenizer
    text = "月亮很圆 🌕🎉 añejo — 東京タワー 👩\u200d💻 done"
    ids = tokenizer.encode_text(text)
    assert len(ids) > len(text) // 2  # many characters span several tokens
    stream = TextStream(tokenizer, ())
    deltas = [stream.advance([i], final=False) for i in ids] + [stream.advance([], final=True)]
    for delta in deltas:
        assert "\ufffd" not in delta, deltas
    assert "".join(deltas) == tokenizer.finalize(tokenizer.decode(ids)) == text


async def test_cancel_storm_leaves_nothing_behind(server, aclient):
    """5 waves of 64 concurrent streams, about 10% cancelled mid-stream: every other stream gets its whole
    answer; afterwards the queue and batch are empty, KV is back to its baseline and created == released."""
    engine, frontend = server.engine, server.runtime.frontend
    # A short system message keeps the prompts at ~20 tokens: prefill is most of a wave's cost on 2 cores.
    greedy = {"temperature": 0.0, "max_new_tokens": STORM_TOKENS, "ignore_eos": True, "system": "Be brief."}
    answers = await asyncio.gather(*(aclient.chat_response(p, **greedy) for p in STORM_PROMPTS))
    expected = {p: a.text for p, a in zip(STORM_PROMPTS, answers, strict=True)}
    await settled(server)
    kv_baseline = engine.stats.kv_tokens
    process = psutil.Process()
    waves, per_wave, failures, cancelled, completed = 5, 64, [], 0, 0
    rss = []

    async def full(i: int, wave: int):
        prompt = STORM_PROMPTS[i % len(STORM_PROMPTS)]
        chunks = [c async for c in aclient.stream_chunks(prompt, request_id=f"storm-{wave}-{i}", **greedy)]
        last = chunks[-1]
        if ("".join(c.delta for c in chunks), last.finish_reason, last.usage.completion_tokens) != \
                (expected[prompt], chat_pb2.FINISH_REASON_LENGTH, STORM_TOKENS):
            failures.append((prompt, [c.delta for c in chunks], last.finish_reason))

    async def cancel_mid_stream(i: int, wave: int):
        call = aclient.stream_chunks(f"Tell me a long story, number {i}.", system="Be brief.", temperature=0.0,
                                     max_new_tokens=400, ignore_eos=True, request_id=f"storm-{wave}-{i}-cancel")
        async for chunk in call:
            if chunk.token_count:
                break
        call.cancel()

    started = time.monotonic()
    for wave in range(waves):
        jobs = [cancel_mid_stream(i, wave) if i % 10 == 0 else full(i, wave) for i in range(per_wave)]
        cancelled += sum(i % 10 == 0 for i in range(per_wave))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        failures.extend(r for r in results if isinstance(r, BaseException))
        completed += sum(i % 10 != 0 for i in range(per_wave))
        await settled(server)
        rss.append(process.memory_info().rss / 2**20)
    elapsed = time.monotonic() - started
    stats = engine.stats
    figures = {"requests": waves * per_wave, "cancelled": cancelled, "completed": completed,
               "failures": len(failures), "seconds": round(elapsed, 1),
               "rss_mb_after_each_wave": [round(m) for m in rss], "kv_tokens": stats.kv_tokens,
               "created": stats.created, "released": stats.released}
    print("cancel storm:", json.dumps(figures))
    assert not failures, failures[:3]
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_tokens == kv_baseline
    assert stats.created == stats.released
    assert not frontend.active and frontend.admission.active == 0
    assert rss[-1] - rss[0] < 100, rss  # no per-request growth (a leak of the whole KV would be far more)


CLIENT = """
import sys
from client.chat_client import ChatClient
client = ChatClient(sys.argv[1], timeout=120)
for chunk in client.stream_chunks("Tell me a very long story about a mountain.", temperature=0.0,
                                  max_new_tokens=2000, ignore_eos=True):
    print("streaming", flush=True)
"""


@pytest.mark.slow
async def test_killed_client_stops_its_generation(server):
    engine = server.engine
    await settled(server)
    dropped = engine.stats.dropped_running
    child = subprocess.Popen([sys.executable, "-c", CLIENT, server.address], stdout=subprocess.PIPE, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
        assert line.strip() == "streaming"
        assert await until(lambda: engine.stats.running == 1)  # the gauges update just after a step's chunks
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert await until(lambda: engine.stats.running == 0, timeout=5), "still generating for a dead client"
    steps = engine.stats.steps
    await asyncio.sleep(0.3)
    assert engine.stats.steps == steps  # nothing is decoding any more
    assert engine.stats.dropped_running == dropped + 1
    assert engine.stats.kv_tokens == 0
    await settled(server)
    assert engine.stats.created == engine.stats.released


async def test_deadline_exceeded_stream_is_reported_as_such(aclient, server):
    call = aclient.stream_chunks("Tell me a very long story.", temperature=0.0, max_new_tokens=2000,
                                 ignore_eos=True, timeout=0.8)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await settled(server)
