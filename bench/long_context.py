"""`make bench-long`: one request at 95 % of the model's context beside 15 short streams, default flags.

    python -m bench.long_context

A server with default flags (the default model: 8192 positions) serves `--streams` closed-loop short streams
(greedy, `--short-tokens` each, the bench prompts in turn). First `--window` seconds without the long request:
the short streams' inter-token latency (ITL) p50. Then one request whose prompt plus answer is `--share` of the
context arrives; the short streams' ITL p50 while it runs (from its submission to its last token) is compared
with the first. Every call must succeed: a refusal or an error counts and is reported. Prints both ITLs, their
ratio (target <= 1.5), the long request's TTFT and tokens, the CPU and its flags; writes
bench/results/long_context.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import grpc

from bench import report
from bench.cpu import cpu_flags, cpu_name
from bench.prompts import PROMPTS
from bench.server_process import ServerProcess
from client.chat_client import AsyncChatClient


class Streams:
    """Short closed-loop streams, each token's arrival time kept."""

    def __init__(self, client: AsyncChatClient, count: int, tokens: int):
        self.client, self.count, self.tokens = client, count, tokens
        self.gaps: list[tuple[float, float]] = []  # (arrival, seconds since the stream's previous token)
        self.errors: list[str] = []
        self.stop = asyncio.Event()

    async def one(self, index: int) -> None:
        turn = 0
        while not self.stop.is_set():
            last = None
            try:
                async for chunk in self.client.stream_chunks(PROMPTS[(index + turn) % len(PROMPTS)],
                                                             temperature=0.0, max_new_tokens=self.tokens,
                                                             ignore_eos=True):
                    now = time.perf_counter()
                    if chunk.token_count and last is not None:
                        self.gaps += [(now, (now - last) / chunk.token_count)] * chunk.token_count
                    if chunk.token_count:
                        last = now
            except grpc.aio.AioRpcError as err:
                self.errors.append(f"{err.code().name}: {err.details()}")
            turn += 1

    def itl_p50(self, start: float, end: float) -> float:
        return statistics.median(gap for at, gap in self.gaps if start <= at <= end)


def notes(count: int) -> str:
    return " ".join(f"Note {n}: the lighthouse keeper wrote that the tide was calm." for n in range(count))


async def long_prompt(client: AsyncChatClient, tokens: int) -> str:
    """Plain sentences of at most `tokens` prompt tokens (the chat template included), counted by the server."""
    small = (await client.count_tokens(notes(100))).prompt_tokens
    large = (await client.count_tokens(notes(200))).prompt_tokens
    per_note = (large - small) / 100
    count = int(100 + (tokens - small) / per_note)
    while (await client.count_tokens(notes(count))).prompt_tokens > tokens:
        count -= 1
    return notes(count)


async def run(address: str, args) -> dict:
    async with AsyncChatClient(address, timeout=1800) as client:
        info = await client.model_info()
        context = info.context_length
        streams = Streams(client, args.streams, args.short_tokens)
        tasks = [asyncio.create_task(streams.one(i)) for i in range(args.streams)]
        await asyncio.sleep(args.settle)
        quiet_start = time.perf_counter()
        await asyncio.sleep(args.window)
        quiet_end = time.perf_counter()
        target = int(args.share * context)
        prompt = await long_prompt(client, target - args.long_tokens)
        long_start, first, usage, long_error = time.perf_counter(), None, None, None
        try:
            async for chunk in client.stream_chunks(prompt, temperature=0.0, max_new_tokens=args.long_tokens,
                                                    ignore_eos=True):
                if chunk.token_count and first is None:
                    first = time.perf_counter() - long_start
                if chunk.HasField("usage"):
                    usage = chunk.usage
        except grpc.aio.AioRpcError as err:
            long_error = f"{err.code().name}: {err.details()}"
        long_end = time.perf_counter()
        streams.stop.set()
        await asyncio.gather(*tasks)
    quiet, loaded = streams.itl_p50(quiet_start, quiet_end), streams.itl_p50(long_start, long_end)
    positions = (usage.prompt_tokens + usage.completion_tokens) if usage else 0
    return {"context_length": context, "long_positions": positions, "long_share": round(positions / context, 3),
            "long_prompt_tokens": usage.prompt_tokens if usage else 0,
            "long_completion_tokens": usage.completion_tokens if usage else 0, "long_error": long_error,
            "long_ttft_s": round(first, 3) if first else None, "long_seconds": round(long_end - long_start, 3),
            "short_streams": args.streams, "short_errors": streams.errors,
            "short_itl_p50_without_s": round(quiet, 4), "short_itl_p50_with_s": round(loaded, 4),
            "itl_ratio": round(loaded / quiet, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=15)
    parser.add_argument("--short-tokens", type=int, default=64)
    parser.add_argument("--share", type=float, default=0.95, help="the long request's positions / the context")
    parser.add_argument("--long-tokens", type=int, default=32, help="the long request's answer")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured without the long request")
    parser.add_argument("--server-arg", action="append", default=[], help="extra chat-server flag (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/long_context.json")
    args = parser.parse_args()
    with ServerProcess.serving("--log-level", "INFO", *args.server_arg) as server:
        result = asyncio.run(run(server.address, args))
    result["server_args"] = args.server_arg
    print(f"long request: {result['long_positions']} of {result['context_length']} positions "
          f"({result['long_share']:.0%}), TTFT {result['long_ttft_s']} s, error {result['long_error']}; "
          f"{args.streams} short streams' ITL p50 {result['short_itl_p50_without_s']:.4f} s without it, "
          f"{result['short_itl_p50_with_s']:.4f} s with it: {result['itl_ratio']:.2f}x (target <= 1.5); "
          f"short errors {len(result['short_errors'])}; CPU {cpu_name()} ({' '.join(cpu_flags())})")
    report.save("long_context", result, args.out)
    return 0 if not result["long_error"] and not result["short_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
