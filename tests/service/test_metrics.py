"""Prometheus metrics, read back from GET /metrics with prometheus-client's parser after a known set of requests:
OK answers, INVALID_ARGUMENT, refusals of a full queue and cancelled streams. The counters equal what happened,
the histograms count every request, and the gauges return to 0 when idle."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.server_process import HTTP_LISTENING
from client.chat_client import AsyncChatClient
from tests.support import busy, until

pytestmark = pytest.mark.slow

BATCH, QUEUE = 2, 4
OK, INVALID, REFUSED = 3, 2, 3


@pytest.fixture(scope="module")
def measured(start_server):
    return start_server(max_batch_size=BATCH, max_queued_requests=QUEUE)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET /metrics, keyed by (name, sorted labels without `model`)."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model"))
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def chat_rpc(method: str, code: str | None = None) -> dict[str, str]:
    labels = {"grpc_service": "chat.v1.ChatService", "grpc_method": method,
              "grpc_type": "unary" if method == "Chat" else "server_stream"}
    return labels if code is None else {**labels, "grpc_code": code}


async def test_metrics_count_what_happened(measured):
    port = measured.runtime.http.port
    engine = measured.engine
    encode = engine.loaded.tokenizer.encode_chat
    async with AsyncChatClient(measured.address, timeout=60, retry=None) as client:
        answers = [await client.chat_response(f"Count from 1 to {5 + i}.", temperature=0.0, max_new_tokens=4,
                                              ignore_eos=True) for i in range(OK)]
        for bad in ({"top_p": 0.0}, {"temperature": -1.0}):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.chat_response("Hello", **bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        async with busy(client, engine, QUEUE, waiting=QUEUE - BATCH):
            for _ in range(REFUSED):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.chat_response("Hello", max_new_tokens=2)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert ("grpc-retry-pushback-ms", "500") in tuple(err.value.trailing_metadata())
        frontend, stats = measured.runtime.frontend, engine.stats
        assert await until(lambda: not frontend.active and frontend.admission.active == 0 and stats.running == 0
                           and stats.waiting == 0 and stats.kv_tokens == 0)
    cancelled = QUEUE  # busy()'s streams, cancelled by the client at the end of the block
    ended = OK + cancelled  # requests that reached the engine

    async def settled():
        return value(await scrape(port), "chat_e2e_request_latency_seconds_count") == ended

    for _ in range(100):
        if await settled():
            break
        await asyncio.sleep(0.05)
    m = await scrape(port)

    # counters
    assert value(m, "chat_request_success_total", finish_reason="LENGTH") == OK
    assert value(m, "chat_request_failure_total", code="INVALID_ARGUMENT") == INVALID
    assert value(m, "chat_request_failure_total", code="RESOURCE_EXHAUSTED") == REFUSED
    assert value(m, "chat_request_failure_total", code="CANCELLED") == cancelled
    busy_prompts = [len(encode(f"Tell me a very long story about ship number {i}.", (), None)) for i in range(QUEUE)]
    assert value(m, "chat_prompt_tokens_total") == sum(a.usage.prompt_tokens for a in answers) + sum(busy_prompts)
    generated = value(m, "chat_generation_tokens_total")
    assert generated >= sum(a.usage.completion_tokens for a in answers) == OK * 4
    assert value(m, "chat_request_generation_tokens_sum") == generated
    # histograms: one sample per request that reached the engine; TTFT and queue time where they apply
    for name in ("chat_e2e_request_latency_seconds", "chat_request_prompt_tokens", "chat_request_generation_tokens"):
        assert value(m, f"{name}_count") == ended, name
        assert value(m, f"{name}_bucket", le="+Inf") == ended, name
    assert OK <= value(m, "chat_time_to_first_token_seconds_count") <= OK + BATCH
    assert OK <= value(m, "chat_inter_token_latency_seconds_count") <= OK + BATCH
    assert OK + BATCH <= value(m, "chat_request_queue_time_seconds_count") <= ended
    # gauges back to 0 when idle
    for gauge in ("chat_requests_running", "chat_requests_waiting", "chat_kv_cache_usage_ratio"):
        assert (gauge, ()) in m and value(m, gauge) == 0.0, gauge
    assert value(m, "chat_prefix_cache_queries_total") > 0
    # gRPC server metrics
    chat_calls = OK + INVALID + REFUSED
    assert value(m, "grpc_server_started_total", **chat_rpc("Chat")) == chat_calls
    assert value(m, "grpc_server_handled_total", **chat_rpc("Chat", "OK")) == OK
    assert value(m, "grpc_server_handled_total", **chat_rpc("Chat", "INVALID_ARGUMENT")) == INVALID
    assert value(m, "grpc_server_handled_total", **chat_rpc("Chat", "RESOURCE_EXHAUSTED")) == REFUSED
    assert value(m, "grpc_server_handling_seconds_count", **chat_rpc("Chat")) == chat_calls
    assert value(m, "grpc_server_started_total", **chat_rpc("StreamChat")) == QUEUE
    assert value(m, "grpc_server_handled_total", **chat_rpc("StreamChat", "CANCELLED")) == QUEUE


async def test_no_metrics_records_nothing_and_no_http_binds_nothing(start_server):
    quiet = start_server({"metrics": False}, max_batch_size=BATCH, max_queued_requests=QUEUE)
    assert quiet.runtime.metrics is None
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{quiet.runtime.http.port}/metrics") as response:
            assert response.status == 404
    async with AsyncChatClient(quiet.address, timeout=60) as client:
        answer = await client.chat_response("Hello", temperature=0.0, max_new_tokens=2)
    assert answer.usage.completion_tokens == 2
    silent = start_server({"http": False}, max_batch_size=BATCH, max_queued_requests=QUEUE)
    assert silent.runtime.http is None


def test_http_listener_logs_its_port(start_server, caplog):
    with caplog.at_level(logging.INFO, logger="service.http.listener"):
        extra = start_server(max_batch_size=BATCH, max_queued_requests=QUEUE)
    port = extra.runtime.http.port
    assert port and f"http listening on 127.0.0.1:{port}" in caplog.text
    found = HTTP_LISTENING.search(caplog.text)
    assert found and int(found.group(1)) == port
