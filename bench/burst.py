"""Burst: how fast are calls refused when the bound on admitted requests is full, against the cheapest RPC?

    python -m bench.burst                          # --max-queued-requests 256 full, then 768 streams + 256 no-ops
    python -m bench.burst --refused 384 --server-arg=--threads=1
    python -m bench.burst --server-dir .cache/chat-v1/<sha>   # chat.v1 as it was at a commit (bench_peers.py
                                                              # --chat-commit unpacks one there)

Starts `python -m service.main` (default model and dtype, as `make run` serves) through ServerProcess; this
process is the client (a separate process, as a caller would be). Each round first fills the bound with
`--max-queued-requests` greedy streams (`--fill-tokens` each; the server's /metrics says when all are
admitted), then starts one burst on the same channel, without client-side retries: `--refused` StreamChat calls
(or unary Chat calls, `--refused-rpc Chat`), which the full server must refuse, evenly mixed with `--no-ops`
GetModelInfo calls (no engine work at all: what the cheapest RPC costs under the same load). Each call is timed
from its own start to its status. The figure is refusal p99 against GetModelInfo p99 in the same burst; then
every filling stream must complete with all its tokens. Writes bench/results/burst.json and a line of
bench/results/burst-history.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import grpc
from chat.v1 import chat_pb2, chat_pb2_grpc

from bench import report as results
from bench.cpu import cpu_flags, cpu_name
from bench.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


async def one_call(stub, i: int, max_new_tokens: int, timeout: float, rpc: str = "StreamChat"):
    """(status name, seconds from start to the end of the call, tokens received) of a StreamChat or Chat call."""
    request = chat_pb2.ChatRequest(prompt=f"Count from 1 to {10 + i % 50}.", request_id=f"burst-{i}",
                                   params=chat_pb2.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                                                                  ignore_eos=True))
    started = time.perf_counter()
    tokens = 0
    try:
        if rpc == "Chat":
            tokens = (await stub.Chat(request, timeout=timeout)).usage.completion_tokens
        else:
            async for chunk in stub.StreamChat(request, timeout=timeout):
                tokens += chunk.token_count
        return "OK", time.perf_counter() - started, tokens
    except grpc.aio.AioRpcError as err:
        return err.code().name, time.perf_counter() - started, tokens


async def one_info(stub, timeout: float) -> tuple[str, float, int]:
    started = time.perf_counter()
    await stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=timeout)
    return "NO_OP", time.perf_counter() - started, 0


async def admitted(http_port: int) -> int:
    """Requests the server has admitted (running plus waiting), from its /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{http_port}/metrics") as reply:
        text = await reply.text()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith(("chat_requests_running{", "chat_requests_waiting{")))


async def burst(server: ServerProcess, args) -> tuple[list, list]:
    """(results of the filling streams, results of the mixed burst: refused streams and no-ops)."""
    async with grpc.aio.insecure_channel(server.address, options=[("grpc.enable_retries", 0)]) as channel:
        await channel.channel_ready()
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        filling = [asyncio.ensure_future(one_call(stub, i, args.fill_tokens, args.timeout))
                   for i in range(args.max_queued_requests)]
        deadline = time.monotonic() + 60
        while await admitted(server.http_port) < args.max_queued_requests:
            if time.monotonic() > deadline:
                raise RuntimeError("the filling streams were never all admitted")
            await asyncio.sleep(0.05)
        every = max(1, (args.refused + args.no_ops) // max(1, args.no_ops))  # a no-op every `every` calls
        calls, refusals = [], 0
        for i in range(args.refused + args.no_ops):
            if i % every == every - 1 and len(calls) - refusals < args.no_ops or refusals == args.refused:
                calls.append(one_info(stub, args.timeout))
            else:
                calls.append(one_call(stub, 10_000 + i, args.fill_tokens, args.timeout, args.refused_rpc))
                refusals += 1
        mixed = await asyncio.gather(*calls)
        return await asyncio.gather(*filling), mixed


def summarize(filling: list[tuple[str, float, int]], mixed: list[tuple[str, float, int]], fill_tokens: int) -> dict:
    codes = Counter(code for code, _, _ in mixed)
    refused = [seconds for code, seconds, _ in mixed if code == "RESOURCE_EXHAUSTED"]
    no_ops = [seconds for code, seconds, _ in mixed if code == "NO_OP"]
    summary = {"burst_codes": dict(codes), "refused": len(refused), "no_ops": len(no_ops),
               "filling_completed": sum(1 for code, _, tokens in filling if code == "OK" and tokens == fill_tokens),
               "filling": len(filling)}
    summary["no_op_seconds"] = {"p50": percentile(no_ops, 50), "p99": percentile(no_ops, 99)}
    if refused:
        summary["refusal_seconds"] = {"p50": percentile(refused, 50), "p99": percentile(refused, 99),
                                      "max": max(refused), "mean": statistics.fmean(refused)}
        summary["refusal_p99_over_no_op_p99"] = summary["refusal_seconds"]["p99"] / summary["no_op_seconds"]["p99"]
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-queued-requests", type=int, default=256)
    parser.add_argument("--refused", type=int, default=768, help="StreamChat calls in the burst (all refused)")
    parser.add_argument("--no-ops", type=int, default=256, help="GetModelInfo calls mixed into the burst")
    parser.add_argument("--refused-rpc", choices=["StreamChat", "Chat"], default="StreamChat",
                        help="the RPC of the refused calls (Chat: unary, as GetModelInfo is)")
    parser.add_argument("--fill-tokens", type=int, default=32, help="greedy tokens of each filling stream")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds, one after the other (the first warms up)")
    parser.add_argument("--server-arg", action="append", default=[], help="extra chat-server flag (repeatable)")
    parser.add_argument("--server-dir", type=Path, default=None, help="run chat-server from this source tree")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/burst.json")
    args = parser.parse_args()
    server_args = ["--max-queued-requests", str(args.max_queued_requests), "--log-level", "INFO",
                   *args.server_arg]
    rounds = []
    where = {"cwd": args.server_dir} if args.server_dir else {}
    with ServerProcess(*server_args, **where) as server:
        server.wait_serving()
        for i in range(args.rounds):
            summary = summarize(*asyncio.run(burst(server, args)), args.fill_tokens)
            print(f"round {i}: {json.dumps(summary)}", flush=True)
            rounds.append(summary)
        code = server.stop()
    report = {"max_queued_requests": args.max_queued_requests, "refused": args.refused, "no_ops": args.no_ops,
              "refused_rpc": args.refused_rpc,
              "fill_tokens": args.fill_tokens, "server_args": server_args, "server_exit": code,
              "server_dir": str(args.server_dir or ROOT), "cpu": cpu_name(), "cpu_flags": cpu_flags(),
              "rounds": rounds}
    last = rounds[-1]
    ratio, tail = last["refusal_p99_over_no_op_p99"], f"{last['filling_completed']}/{last['filling']}"
    print(f"{args.refused_rpc} refusal p99 {last['refusal_seconds']['p99']:.3f} s, GetModelInfo p99 "
          f"{last['no_op_seconds']['p99']:.3f} s in the same burst: {ratio:.2f}x (target <= 1.25); filling "
          f"streams completed {tail}; CPU {cpu_name()} ({' '.join(cpu_flags())})")
    results.save("burst", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
