"""bench_peers.py against a fake llama-server: the request it sends, how it counts tokens, errors and ratios.
No model and no real llama-server are needed."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web

from bench.bench_peers import Figures, Request, closed_loop, llama_stream, percentile, targets, timed

NEW_TOKENS = 5
PROMPT_IDS = [[1, 2, 3], [4, 5, 6, 7]]


def sse(*events: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)


async def fake_llama_server(behaviour: str):
    """A /completion endpoint that streams like llama-server: one token per event, `stop` on the last."""
    seen: list[dict] = []

    async def completion(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if behaviour == "error":
            await response.write(sse({"error": {"code": 500, "message": "boom"}}))
            return response
        count = body["n_predict"] - (1 if behaviour == "short" else 0)
        # a multibyte character held back: two tokens arrive in one event
        events = [{"content": "ab", "tokens": [10, 11], "stop": False}]
        events += [{"content": f" t{i}", "tokens": [20 + i], "stop": False} for i in range(count - 2)]
        events.append({"content": "", "tokens": [], "stop": True, "stop_type": "limit",
                       "timings": {"predicted_n": count}})
        for event in events:
            await response.write(sse(event))
        return response

    app = web.Application()
    app.router.add_post("/completion", completion)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}", seen


@pytest.mark.timeout(30)
async def test_llama_stream_sends_ids_and_counts_every_token():
    runner, url, seen = await fake_llama_server("ok")
    try:
        async with aiohttp.ClientSession() as session:
            stream = llama_stream(session, url, PROMPT_IDS, NEW_TOKENS)
            figures = await closed_loop("llama-server", stream, clients=2, rounds=2, prompts=len(PROMPT_IDS))
    finally:
        await runner.cleanup()
    assert sorted(body["prompt"] for body in seen) == sorted(PROMPT_IDS * 2)
    assert all(body["n_predict"] == NEW_TOKENS and body["ignore_eos"] is True and body["temperature"] == 0.0
               and body["top_k"] == 1 and body["stream"] is True and body["return_tokens"] is True
               for body in seen)
    assert [r.tokens for r in figures.requests] == [NEW_TOKENS] * 4
    assert all(r.text == "ab t0 t1 t2" and r.ttft is not None and len(r.itl) == NEW_TOKENS - 1
               for r in figures.requests)
    summary = figures.summary(NEW_TOKENS)
    assert summary["errors"] == 0 and summary["completion_tokens"] == 4 * NEW_TOKENS
    assert summary["tokens_per_s"] == pytest.approx(4 * NEW_TOKENS / figures.seconds, rel=1e-2)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("behaviour", ["error", "short"])
async def test_errors_and_short_answers_count_as_errors(behaviour):
    runner, url, _ = await fake_llama_server(behaviour)
    try:
        async with aiohttp.ClientSession() as session:
            request = await timed(llama_stream(session, url, PROMPT_IDS, NEW_TOKENS)(0))
    finally:
        await runner.cleanup()
    if behaviour == "error":
        assert request.error and "boom" in request.error
    else:
        assert request.error is None and request.tokens == NEW_TOKENS - 1
    assert Figures("llama-server", 1, 1.0, [request]).summary(NEW_TOKENS)["errors"] == 1


def test_targets_are_ratios_to_llama_server_in_the_same_run():
    def row(system, clients, tps, ttft):
        return {"system": system, "clients": clients, "tokens_per_s": tps, "ttft_p50_s": ttft}

    rows = [row("llama-server", 1, 100.0, 0.1), row("chat.v1", 1, 30.0, 0.2),
            row("llama-server", 16, 200.0, 1.0), row("chat.v1", 16, 100.0, 2.0),
            row("llama-server", 32, 210.0, 2.0), row("chat.v1", 32, 160.0, 3.0)]
    found = {name: t["value"] for name, t in targets(rows).items()}
    assert found == {"C1_chat_over_llama": 0.3, "C16_chat_over_llama": 0.5, "C32_chat_over_llama_C16": 0.8,
                     "C16_ttft_p50_chat_over_llama": 2.0}
    assert targets(rows[:2])["C16_chat_over_llama"]["value"] is None


def test_percentile():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([7.0], 95) == 7.0
    assert Request().tokens == 0
