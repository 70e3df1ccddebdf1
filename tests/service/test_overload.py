"""Admission control, queued cancellation and deadlines, step faults and a dead engine, on a deliberately small
server (batch 2, at most 4 admitted) that shares the session server's model."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest
import torch
from chat.v1 import chat_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.chat_client import AsyncChatClient
from service.engine.engine import DeviceLost
from service.engine.faults import Faults
from tests.support import busy, raw_grpc_call, until

pytestmark = pytest.mark.slow

BATCH, QUEUE = 2, 4


@pytest.fixture(scope="module")
def faults():
    return Faults()


@pytest.fixture(scope="module")
def small(start_server, faults):
    return start_server(max_batch_size=BATCH, max_queued_requests=QUEUE, faults=faults)


@pytest.fixture
async def sclient(small):
    # No client-side retries: these tests look at each refusal itself (retries honour its pushback and wait).
    async with AsyncChatClient(small.address, timeout=60, retry=None) as c:
        yield c


async def settled(small) -> None:
    """Every admitted request has left the servicer and the engine holds nothing."""
    frontend, stats = small.runtime.frontend, small.engine.stats
    assert await until(lambda: not frontend.active and frontend.admission.active == 0
                       and stats.running == 0 and stats.waiting == 0)
    assert stats.kv_tokens == 0 and stats.created == stats.released


async def outcome(coro):
    """(code, response or details, seconds)."""
    started = time.monotonic()
    try:
        response = await coro
        return grpc.StatusCode.OK, response, time.monotonic() - started
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details(), time.monotonic() - started


async def test_overload_is_refused_at_once_and_every_admitted_request_completes(small, sclient):
    offered = 4 * QUEUE
    results = await asyncio.gather(*(
        outcome(sclient.chat_response(f"Count from 1 to {10 + i}.", temperature=0.0, max_new_tokens=16,
                                      ignore_eos=True)) for i in range(offered)))
    admitted = [r for code, r, _ in results if code == grpc.StatusCode.OK]
    refused = [(r, seconds) for code, r, seconds in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(admitted) + len(refused) == offered, [code for code, _, _ in results]
    assert len(admitted) >= QUEUE and len(refused) >= offered // 2
    assert all(r.usage.completion_tokens == 16 and r.finish_reason == chat_pb2.FINISH_REASON_LENGTH
               for r in admitted)
    assert all("limit of 4 requests" in details for details, _ in refused)
    assert max(seconds for _, seconds in refused) < 1.0  # refused at once, not after waiting
    await settled(small)


async def test_refusal_is_trailers_only(small, sclient):
    """RESOURCE_EXHAUSTED comes before any response header: one HEADERS frame with END_STREAM and grpc-status,
    so clients (and proxies) may retry it safely. A normal answer, for contrast, has headers, data, trailers."""
    request = chat_pb2.ChatRequest(prompt="Hello", params=chat_pb2.SamplingParams(max_new_tokens=2)).SerializeToString()
    normal = await asyncio.to_thread(raw_grpc_call, small.port, "/chat.v1.ChatService/GetModelInfo", b"")
    kinds = [type(e).__name__ for e in normal]
    assert kinds == ["ResponseReceived", "DataReceived", "TrailersReceived", "StreamEnded"], kinds
    async with busy(sclient, small.engine, QUEUE, waiting=QUEUE - BATCH):
        assert small.runtime.frontend.admission.active == QUEUE
        for path in ("/chat.v1.ChatService/Chat", "/chat.v1.ChatService/StreamChat"):
            events = await asyncio.to_thread(raw_grpc_call, small.port, path, request)
            kinds = [type(e).__name__ for e in events]
            assert kinds == ["ResponseReceived", "StreamEnded"], kinds  # no DATA, no separate trailers
            headers = dict(events[0].headers)
            assert events[0].stream_ended is not None  # END_STREAM on the one HEADERS frame
            assert headers[":status"] == "200"
            assert headers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
            assert headers["grpc-retry-pushback-ms"] == "500"  # how long a retrying client waits (gRFC A6)
    await settled(small)


async def test_deadline_passing_in_the_queue_never_reaches_the_model(small, sclient):
    stats = small.engine.stats
    async with busy(sclient, small.engine, BATCH):
        prefilled, expired = stats.prefilled, stats.expired_in_queue
        code, _, seconds = await outcome(sclient.chat_response("What is 2+2?", temperature=0.0,
                                                               max_new_tokens=8, timeout=0.5))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and seconds < 1.5
        assert await until(lambda: stats.expired_in_queue == expired + 1 and stats.waiting == 0, timeout=2)
        assert stats.prefilled == prefilled  # the expired request was never prefilled
    await settled(small)


async def test_cancelled_while_queued_leaves_the_queue(small, sclient):
    stats = small.engine.stats
    async with busy(sclient, small.engine, BATCH):
        prefilled, cancelled = stats.prefilled, stats.cancelled_in_queue
        call = sclient.stream_chunks("What is 2+2?", temperature=0.0, max_new_tokens=8)
        assert await until(lambda: stats.waiting == 1)
        call.cancel()
        assert await until(lambda: stats.cancelled_in_queue == cancelled + 1 and stats.waiting == 0, timeout=2)
        assert stats.prefilled == prefilled
    await settled(small)


@pytest.mark.parametrize("error, code", [
    (RuntimeError("injected fault"), grpc.StatusCode.INTERNAL),
    (torch.OutOfMemoryError("injected: CUDA out of memory"), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
async def test_step_fault_fails_only_that_step_and_the_engine_recovers(small, sclient, faults, error, code,
                                                                     caplog):
    engine = small.engine
    fired = []

    def fail_once(_plan):
        if not fired:
            fired.append(True)
            raise error

    failed_steps = engine.stats.failed_steps
    running = [outcome(_drain(sclient.stream_chunks(f"Tell me a long story, part {i}.", temperature=0.0,
                                                    max_new_tokens=400, ignore_eos=True, timeout=30)))
               for i in range(BATCH)]
    running = [asyncio.ensure_future(c) for c in running]
    assert await until(lambda: engine.stats.running == BATCH)
    queued = asyncio.ensure_future(outcome(sclient.chat_response("What is the capital of France?",
                                                                 temperature=0.0, max_new_tokens=8, timeout=30)))
    assert await until(lambda: engine.stats.waiting == 1)
    with caplog.at_level(logging.ERROR, logger="service.engine.engine"):
        faults.step = fail_once
        try:
            failed = await asyncio.gather(*running)
            survivor = await queued
        finally:
            faults.step = None
    assert [c for c, _, _ in failed] == [code] * BATCH, failed
    assert all(seconds < 10 for _, _, seconds in failed)  # failed promptly, well inside their deadline
    assert survivor[0] == grpc.StatusCode.OK and survivor[1].usage.completion_tokens > 0  # not in the bad step
    assert engine.stats.failed_steps == failed_steps + 1
    if code == grpc.StatusCode.INTERNAL:
        assert "injected fault" in caplog.text and "Traceback" in caplog.text  # bugs: logged with the traceback
    else:
        assert "ran out of memory" in caplog.text
    after = await sclient.chat_response("What is the capital of France?", temperature=0.0, max_new_tokens=16)
    assert "Paris" in after.text
    await settled(small)


async def test_more_answers_than_batch_rows_wait_for_rows_and_equal_their_solo_seeds(small, sclient):
    """n 4 on a batch of 2 rows: the answers that find no free row wait as new arrivals (their prompt's blocks
    cached), and each is still the answer its seed gives alone."""
    params = dict(temperature=1.0, top_p=0.95, max_new_tokens=8)
    reply = await sclient.chat_response("Name a colour.", n=4, seed=21, **params)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    solo = [(await sclient.chat_response("Name a colour.", seed=21 + i, **params)).text for i in range(4)]
    assert [c.text for c in reply.choices] == solo
    await settled(small)


async def _drain(call):
    return [chunk async for chunk in call]


class Fatal(BaseException):
    """Escapes the engine's per-step recovery: the worker thread dies."""


async def kill_the_engine(server, client, faults: Faults, error: BaseException) -> None:
    """Inject `error` into a step while every admitted request is running or queued, and check the engine's
    death: every caller gets UNAVAILABLE promptly, health goes NOT_SERVING, later calls are UNAVAILABLE at once."""
    engine = server.engine
    calls = [asyncio.ensure_future(outcome(_drain(client.stream_chunks(
        f"Tell me a long story, part {i}.", temperature=0.0, max_new_tokens=400, ignore_eos=True, timeout=60))))
        for i in range(QUEUE)]
    assert await until(lambda: engine.stats.running == BATCH and engine.stats.waiting == QUEUE - BATCH)

    def die(_plan):
        raise error

    faults.step = die
    results = await asyncio.gather(*calls)
    assert [code for code, _, _ in results] == [grpc.StatusCode.UNAVAILABLE] * QUEUE, results
    assert all(seconds < 10 for _, _, seconds in results)
    assert not engine.alive
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status():
            return (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status

        for _ in range(50):
            if await status() == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.05)
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
    code, details, seconds = await outcome(client.chat_response("Hello", max_new_tokens=4))
    assert code == grpc.StatusCode.UNAVAILABLE and seconds < 1, details
    assert not server.runtime.frontend.active and server.runtime.frontend.admission.active == 0


async def test_a_lost_device_stops_the_engine_and_goes_not_serving(start_server):
    """A CUDA error that poisons the context (here injected on the CPU as torch raises it) is not one bad step:
    every later step would fail too, so the engine stops as if its worker died, for an orchestrator to restart."""
    faults = Faults()
    doomed = start_server(max_batch_size=BATCH, max_queued_requests=QUEUE, faults=faults)
    async with AsyncChatClient(doomed.address, timeout=60, retry=None) as client:
        await kill_the_engine(doomed, client, faults,
                              torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert isinstance(doomed.engine.failed, DeviceLost)
    assert isinstance(doomed.engine.failed.__cause__, torch.AcceleratorError)


async def test_dead_engine_goes_not_serving_and_fails_callers_at_once(small, sclient, faults):
    """Runs last in this module: it kills the small server's engine."""
    await kill_the_engine(small, sclient, faults, Fatal("injected: the worker cannot go on"))
    assert isinstance(small.engine.failed, Fatal)
