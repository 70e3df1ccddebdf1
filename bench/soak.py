"""Soak test: many requests against a real `chat-server` process, some cancelled mid-stream; does memory stay put?

    python -m bench.soak                       # 2000 requests, 16 at a time, 10% cancelled (make soak)
    python -m bench.soak --requests 3000 --concurrency 32

Starts `python -m service.main` on a free port (default model and dtype, as `make run` serves), sends the
requests, samples the server's RSS as they complete, then SIGTERMs it and reads the engine's counters from
its "engine at stop" log line. Reports the RSS slope (MB per 100 requests, least-squares line through the
samples after the warm-up) and the KV tokens still in use at the end, and writes bench/results/soak.json.

The warm-up is long on purpose: on the 2-core CPU this was written on, the server's RSS rises for about the
first 1000 requests (allocator arenas, the prefix cache filling, KV buffers of many shapes) and then flattens;
a fit that starts earlier mistakes that for a leak. The second fit, over the last half, cross-checks it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import psutil

from bench import report as results
from bench.server_process import ServerProcess
from client.chat_client import AsyncChatClient

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Count from 1 to 20.",
    "Explain photosynthesis in one sentence.", "请用中文介绍一下巴黎。", "List three fruits.",
    "Give me a name for a cat.", "What is 12 times 7?", "Describe a sunset in two sentences.",
    "Tell me a joke about computers.",
]


def rss_mb(server: ServerProcess) -> float:
    return psutil.Process(server.proc.pid).memory_info().rss / 2**20


def slope_per_100(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MB) against requests done, per 100 requests."""
    n = len(points)
    if n < 2:
        return float("nan")
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return 100 * sxy / sxx


async def soak(args, server: ServerProcess) -> dict:
    rng = random.Random(args.seed)
    plan = []
    for i in range(args.requests):
        cancel = rng.random() < args.cancel_fraction
        history = [] if rng.random() < 0.7 else [(rng.choice(PROMPTS), "I am not sure, but I will try.")]
        plan.append({"i": i, "cancel": cancel, "prompt": rng.choice(PROMPTS), "history": history,
                     "max_new_tokens": 200 if cancel else rng.randint(4, args.max_new_tokens),
                     "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": rng.randrange(2**32)})
    outcomes: Counter[str] = Counter()
    samples: list[tuple[int, float]] = []
    done = 0
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async with AsyncChatClient(server.address, timeout=120) as client:
        async def one(item) -> str:
            call = client.stream_chunks(item["prompt"], item["history"], temperature=item["temperature"],
                                        seed=item["seed"], max_new_tokens=item["max_new_tokens"],
                                        ignore_eos=item["cancel"], request_id=f"soak-{item['i']}")
            try:
                async for chunk in call:
                    if item["cancel"] and chunk.token_count:
                        call.cancel()
                        return "cancelled"
                return "ok"
            except asyncio.CancelledError:
                return "cancelled"
            except grpc.aio.AioRpcError as err:
                return "cancelled" if item["cancel"] and err.code() == grpc.StatusCode.CANCELLED else err.code().name

        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                item = queue.get_nowait()
                outcomes[await one(item)] += 1
                done += 1
                if done % args.sample_every == 0:
                    samples.append((done, rss_mb(server)))
                    if done % (args.sample_every * 8) == 0:
                        print(f"  {done:5d} requests, server RSS {samples[-1][1]:.0f} MB", flush=True)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.monotonic() - started
    warm = [(n, mb) for n, mb in samples if n > args.warmup]
    return {"requests": args.requests, "concurrency": args.concurrency, "outcomes": dict(outcomes),
            "seconds": round(elapsed, 1), "requests_per_s": round(args.requests / elapsed, 2),
            "rss_mb_samples": [(n, round(mb, 1)) for n, mb in samples], "warmup_requests": args.warmup,
            "rss_mb_after_warmup": round(warm[0][1], 1) if warm else None,
            "rss_mb_at_end": round(samples[-1][1], 1) if samples else None,
            "rss_slope_mb_per_100_requests": round(slope_per_100(warm), 3),
            "rss_slope_last_half_mb_per_100_requests": round(
                slope_per_100([(n, mb) for n, mb in samples if n > args.requests // 2]), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cancel-fraction", type=float, default=0.1)
    parser.add_argument("--max-new-tokens", type=int, default=24, help="upper bound for answers not cancelled")
    parser.add_argument("--warmup", type=int, default=1000, help="requests left out of the RSS fit")
    parser.add_argument("--sample-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[], help="extra chat-server argument")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/soak.json")
    args = parser.parse_args(argv)

    server = ServerProcess("--log-level", "INFO", "--grace-seconds", "10", *args.server_arg)
    try:
        server.wait_serving(timeout=300)
        baseline = rss_mb(server)
        print(f"soak: {args.requests} requests, {args.concurrency} at a time, ~{args.cancel_fraction:.0%} "
              f"cancelled, against {server.address} (RSS {baseline:.0f} MB after warm-up)", flush=True)
        report = asyncio.run(soak(args, server))
        time.sleep(1.0)  # cancellations land at the engine's next step
        report["rss_mb_before_load"] = round(baseline, 1)
    finally:
        exit_code = server.stop(timeout=120) if server.proc.poll() is None else server.proc.returncode
    counters = server.engine_counters()
    report["server_exit_code"] = exit_code
    report["engine_at_end"] = counters
    report["kv_tokens_at_end"] = counters.get("kv_tokens")
    report["server"] = server.serving_line()
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mb_samples"}, indent=2))
    results.save("soak", report, args.out)
    failed = sum(v for k, v in report["outcomes"].items() if k not in ("ok", "cancelled"))
    report["kv_blocks_at_end"] = {k: counters.get(f"kv_blocks_{k}") for k in ("pool", "free", "cached")}
    leaked = (counters.get("created") != counters.get("released") or counters.get("kv_tokens")
              or counters.get("kv_blocks_free") != counters.get("kv_blocks_pool"))
    return 1 if failed or leaked or exit_code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
