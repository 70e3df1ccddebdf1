"""Burst: what does a refusal cost when the bound on admitted requests is full, against the cheapest RPC?

    python -m bench.burst                          # --max-queued-requests 256 full, then each burst of 1024 calls
    python -m bench.burst --rounds 2 --server-arg=--threads=1
    python -m bench.burst --server-dir .cache/chat-v1/<sha>   # chat.v1 as it was at a commit (bench_peers.py
                                                              # --chat-commit unpacks one there)

Starts `python -m service.main` (default model and dtype, as `make run` serves) through ServerProcess; this
process is the client (a separate process, as a caller would be). Before each burst it fills the bound with
`--max-queued-requests` greedy streams (`--fill-tokens` each; the server's /metrics says when all are admitted),
then starts the burst on the same channel, without client-side retries, and afterwards checks that every
filling stream completed with all its tokens. Each call is timed from its own start to its status. The bursts
of a round (BURSTS; `--burst` calls each):

- `mixed 3:1`: 3/4 StreamChat calls (or unary Chat, `--refused-rpc Chat`), which the full server must refuse,
  evenly mixed with 1/4 GetModelInfo calls (no engine work at all: the no-op);
- `control 3:1`: the same mix with Health.Check calls in place of the refused ones: nothing is refused, so
  what this ratio shows is how grpc serves a mix of two methods, not what a refusal costs;
- `mixed 1:1`: refusals and no-ops, half each: the figure the target is about (refusal p99 against no-op p99
  in the same burst);
- `refusals alone` and `no-ops alone`: 3/4 of `--burst` calls of one kind; their p99s compared say what a
  refusal costs against a no-op when neither waits behind the other.

Writes bench/results/burst.json and a line of bench/results/burst-history.jsonl.
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
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import report as results
from bench.cpu import cpu_flags, cpu_name
from bench.server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.25  # refusal p99 at most this many times the no-op p99

# name -> ((kind, share of --burst), ...): the calls of one burst, evenly mixed
BURSTS = {
    "mixed 3:1": (("refused", 3 / 4), ("no_op", 1 / 4)),
    "control 3:1": (("health", 3 / 4), ("no_op", 1 / 4)),
    "mixed 1:1": (("refused", 1 / 2), ("no_op", 1 / 2)),
    "refusals alone": (("refused", 3 / 4),),
    "no-ops alone": (("no_op", 3 / 4),),
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


def chat_request(i: int, max_new_tokens: int) -> chat_pb2.ChatRequest:
    return chat_pb2.ChatRequest(prompt=f"Count from 1 to {10 + i % 50}.", request_id=f"burst-{i}",
                                params=chat_pb2.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                                                               ignore_eos=True))


async def one_call(stub, i: int, max_new_tokens: int, timeout: float, rpc: str = "StreamChat"):
    """(status name, seconds from start to the end of the call, tokens received) of a StreamChat or Chat call."""
    request = chat_request(i, max_new_tokens)
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


async def timed(kind: str, call) -> tuple[str, str, float]:
    """(kind, status name, seconds) of an awaitable unary call."""
    started = time.perf_counter()
    try:
        await call
        return kind, "OK", time.perf_counter() - started
    except grpc.aio.AioRpcError as err:
        return kind, err.code().name, time.perf_counter() - started


async def admitted(http_port: int) -> int:
    """Requests the server has admitted (running plus waiting), from its /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{http_port}/metrics") as reply:
        text = await reply.text()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith(("chat_requests_running{", "chat_requests_waiting{")))


def mixed(parts: tuple[tuple[str, float], ...], size: int) -> list[str]:
    """The kinds of a burst of `size` calls with these shares, evenly interleaved (3:1 gives r r r n r r r n)."""
    counts = {kind: round(share * size) for kind, share in parts}
    order, given = [], Counter()
    for i in range(sum(counts.values())):
        # the kind furthest behind its share of the first i + 1 calls goes next
        kind = max(counts, key=lambda k: counts[k] * (i + 1) / sum(counts.values()) - given[k])
        order.append(kind)
        given[kind] += 1
    return order


async def burst(server: ServerProcess, kinds: list[str], args) -> tuple[list, list]:
    """(results of the filling streams, (kind, status, seconds) of each call of the burst)."""
    async with grpc.aio.insecure_channel(server.address, options=[("grpc.enable_retries", 0)]) as channel:
        await channel.channel_ready()
        stub, health = chat_pb2_grpc.ChatServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        filling = [asyncio.ensure_future(one_call(stub, i, args.fill_tokens, args.timeout))
                   for i in range(args.max_queued_requests)]
        deadline = time.monotonic() + 60
        while await admitted(server.http_port) < args.max_queued_requests:
            if time.monotonic() > deadline:
                raise RuntimeError("the filling streams were never all admitted")
            await asyncio.sleep(0.05)

        def call(i: int, kind: str):
            if kind == "no_op":
                return timed(kind, stub.GetModelInfo(chat_pb2.GetModelInfoRequest(), timeout=args.timeout))
            if kind == "health":
                return timed(kind, health.Check(health_pb2.HealthCheckRequest(), timeout=args.timeout))
            return refused(i)

        async def refused(i: int):
            code, seconds, _ = await one_call(stub, 10_000 + i, args.fill_tokens, args.timeout, args.refused_rpc)
            return "refused", code, seconds

        calls = await asyncio.gather(*(call(i, kind) for i, kind in enumerate(kinds)))
        return await asyncio.gather(*filling), calls


def summarize(filling: list[tuple[str, float, int]], calls: list[tuple[str, str, float]], fill_tokens: int) -> dict:
    """Codes, p50/p99/max seconds per kind, and whether the filling streams all completed."""
    summary = {"codes": {kind: dict(Counter(code for k, code, _ in calls if k == kind))
                         for kind in dict.fromkeys(k for k, _, _ in calls)},
               "filling_completed": sum(1 for code, _, tokens in filling if code == "OK" and tokens == fill_tokens),
               "filling": len(filling)}
    for kind in summary["codes"]:
        seconds = [s for k, _, s in calls if k == kind]
        summary[f"{kind}_seconds"] = {"p50": percentile(seconds, 50), "p99": percentile(seconds, 99),
                                      "max": max(seconds), "mean": statistics.fmean(seconds)}
    return summary


def p99(summary: dict, kind: str) -> float:
    return summary[f"{kind}_seconds"]["p99"]


def ratios(round_: dict) -> dict:
    """The p99 ratios of one round: each mix's first kind against its no-ops, and refusals alone against
    no-ops alone."""
    found = {name: p99(round_[name], parts[0][0]) / p99(round_[name], "no_op")
             for name, parts in BURSTS.items() if len(parts) == 2}
    found["alone"] = p99(round_["refusals alone"], "refused") / p99(round_["no-ops alone"], "no_op")
    return found


def check_round(round_: dict, rpc: str) -> list[str]:
    """What went wrong in a round: a refused call that was not RESOURCE_EXHAUSTED, a no-op or health check that
    failed, a filling stream that did not complete."""
    wrong, expected = [], {"refused": "RESOURCE_EXHAUSTED", "no_op": "OK", "health": "OK"}
    for name, summary in round_.items():
        for kind, codes in summary["codes"].items():
            if set(codes) != {expected[kind]}:
                wrong.append(f"{name}: {kind} calls ended {codes}, all should be {expected[kind]} ({rpc})")
        if summary["filling_completed"] != summary["filling"]:
            wrong.append(f"{name}: {summary['filling_completed']} of {summary['filling']} filling streams completed")
    return wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-queued-requests", type=int, default=256)
    parser.add_argument("--burst", type=int, default=1024, help="calls in a mixed burst (alone: 3/4 of this)")
    parser.add_argument("--refused-rpc", choices=["StreamChat", "Chat"], default="StreamChat",
                        help="the RPC of the refused calls (Chat: unary, as GetModelInfo is)")
    parser.add_argument("--fill-tokens", type=int, default=32, help="greedy tokens of each filling stream")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, one after the other")
    parser.add_argument("--server-arg", action="append", default=[], help="extra chat-server flag (repeatable)")
    parser.add_argument("--server-dir", type=Path, default=None, help="run chat-server from this source tree")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/burst.json")
    args = parser.parse_args()
    server_args = ["--max-queued-requests", str(args.max_queued_requests), "--log-level", "INFO",
                   *args.server_arg]
    rounds, wrong = [], []
    where = {"cwd": args.server_dir} if args.server_dir else {}
    with ServerProcess(*server_args, **where) as server:
        server.wait_serving()
        for i in range(args.rounds):
            round_ = {name: summarize(*asyncio.run(burst(server, mixed(parts, args.burst), args)), args.fill_tokens)
                      for name, parts in BURSTS.items()}
            round_["ratios"] = ratios(round_)
            wrong += [f"round {i}: {line}" for line in check_round(
                {k: v for k, v in round_.items() if k != "ratios"}, args.refused_rpc)]
            print(f"round {i}: {json.dumps(round_)}", flush=True)
            rounds.append(round_)
        code = server.stop()
    report = {"max_queued_requests": args.max_queued_requests, "burst": args.burst, "refused_rpc": args.refused_rpc,
              "fill_tokens": args.fill_tokens, "server_args": server_args, "server_exit": code,
              "server_dir": str(args.server_dir or ROOT), "cpu": cpu_name(), "cpu_flags": cpu_flags(),
              "rounds": rounds, "wrong": wrong}
    print(f"CPU {cpu_name()} ({' '.join(cpu_flags())}); {args.refused_rpc} refusals against GetModelInfo no-ops, "
          f"bound of {args.max_queued_requests} full; p99 ratio per round (target <= {TARGET} for 'mixed 1:1' and "
          "'alone'):")
    for name in rounds[0]["ratios"]:
        print(f"  {name:12s} " + ", ".join(f"{r['ratios'][name]:.2f}" for r in rounds))
    for line in wrong:
        print(f"WRONG: {line}")
    results.save("burst", report, args.out)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
