"""Burst: many concurrent StreamChat calls at once against a real `chat-server` with a bound on admitted
requests. How fast are the refused ones refused, and does every admitted one complete?

    python -m bench.burst                          # 1024 streams against --max-queued-requests 256
    python -m bench.burst --calls 512 --server-arg=--threads=1
    python -m bench.burst --server-dir .cache/chat-v1/<sha>   # chat.v1 as it was at a commit (bench_peers.py
                                                              # --chat-commit unpacks one there)

Starts `python -m service.main` (default model and dtype, as `make run` serves) through ServerProcess; this
process is the client (a separate process, as a caller would be). All calls are started together on one
channel without client-side retries; each call's time is measured from its own start to its status (refused)
or its last chunk (admitted). Before each burst, a "floor" burst of as many GetModelInfo calls (no engine work
at all) shows what the cheapest RPC costs under the same conditions. Writes bench/results/burst.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
from chat.v1 import chat_pb2, chat_pb2_grpc

from bench.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


async def one_call(stub, i: int, max_new_tokens: int, timeout: float) -> tuple[str, float, int]:
    """(status name, seconds from start to the end of the call, tokens received)."""
    request = chat_pb2.ChatRequest(prompt=f"Count from 1 to {10 + i % 50}.", request_id=f"burst-{i}",
                                   params=chat_pb2.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                                                                  ignore_eos=True))
    started = time.perf_counter()
    tokens = 0
    try:
        async for chunk in stub.StreamChat(request, timeout=timeout):
            tokens += chunk.token_count
        return "OK", time.perf_counter() - started, tokens
    except grpc.aio.AioRpcError as err:
        return err.code().name, time.perf_counter() - started, tokens


async def one_info(stub, timeout: float) -> float:
    started = time.perf_counter()
    await stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=timeout)
    return time.perf_counter() - started


async def burst(address: str, calls: int, max_new_tokens: int, timeout: float):
    """(floor seconds of `calls` GetModelInfo calls at once, results of `calls` StreamChat calls at once)."""
    options = [("grpc.enable_retries", 0)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        await channel.channel_ready()
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        floor = await asyncio.gather(*(one_info(stub, timeout) for _ in range(calls)))
        results = await asyncio.gather(*(one_call(stub, i, max_new_tokens, timeout) for i in range(calls)))
        return floor, results


def summarize(floor: list[float], results: list[tuple[str, float, int]], max_new_tokens: int) -> dict:
    codes = Counter(code for code, _, _ in results)
    refused = [seconds for code, seconds, _ in results if code == "RESOURCE_EXHAUSTED"]
    admitted = [(seconds, tokens) for code, seconds, tokens in results if code == "OK"]
    summary = {"codes": dict(codes), "refused": len(refused), "admitted_completed": len(admitted),
               "admitted_with_all_tokens": sum(1 for _, tokens in admitted if tokens == max_new_tokens)}
    summary["floor_get_model_info_seconds"] = {"p50": percentile(floor, 50), "p99": percentile(floor, 99)}
    if refused:
        summary["refusal_seconds"] = {"p50": percentile(refused, 50), "p99": percentile(refused, 99),
                                      "max": max(refused), "mean": statistics.fmean(refused)}
    if admitted:
        seconds = [s for s, _ in admitted]
        summary["admitted_seconds"] = {"p50": percentile(seconds, 50), "p99": percentile(seconds, 99),
                                       "max": max(seconds)}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1024)
    parser.add_argument("--max-queued-requests", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--rounds", type=int, default=2, help="bursts, one after the other (the first warms up)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra chat-server flag (repeatable)")
    parser.add_argument("--server-dir", type=Path, default=None,
                        help="run chat-server from this source tree (e.g. an older commit's, without --http-port)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/burst.json")
    args = parser.parse_args()
    server_args = ["--max-queued-requests", str(args.max_queued_requests), "--log-level", "INFO",
                   *args.server_arg]
    rounds = []
    where = {"cwd": args.server_dir, "http": False} if args.server_dir else {}
    with ServerProcess(*server_args, **where) as server:
        server.wait_serving()
        for i in range(args.rounds):
            floor, results = asyncio.run(burst(server.address, args.calls, args.max_new_tokens, args.timeout))
            summary = summarize(floor, results, args.max_new_tokens)
            print(f"round {i}: {json.dumps(summary)}", flush=True)
            rounds.append(summary)
        code = server.stop()
    report = {"calls": args.calls, "max_queued_requests": args.max_queued_requests,
              "max_new_tokens": args.max_new_tokens, "server_args": server_args, "server_exit": code,
              "server_dir": str(args.server_dir or ROOT),
              "machine": platform.processor() or platform.machine(), "rounds": rounds}
    results.save("burst", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
