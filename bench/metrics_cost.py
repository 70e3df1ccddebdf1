"""What recording metrics costs: the same closed-loop StreamChat load against `chat-server --metrics` and
`--no-metrics`, alternated, so slow drifts of a shared machine hit both alike.

    python -m bench.metrics_cost                       # 4 clients x 6 requests x 64 tokens, 2 pairs of runs
    python -m bench.metrics_cost --clients 8 --pairs 3

Each run starts its own server (ServerProcess, default model and dtype as `make run` serves), warms it up with
one request per client, then times the load: tokens/s is every generated token over the wall time. With
metrics on, /metrics is scraped once a second during the run, as Prometheus would (more often than usual).
Writes bench/results/metrics_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from bench import report as results
from bench.server_process import ServerProcess
from client.chat_client import AsyncChatClient

ROOT = Path(__file__).resolve().parents[1]


async def closed_loop(address: str, clients: int, requests: int, tokens: int) -> int:
    async with AsyncChatClient(address, timeout=600, retry=None) as client:
        async def one_client(c: int) -> int:
            done = 0
            for r in range(requests):
                async for chunk in client.stream_chunks(f"Tell me about the number {c * 100 + r}.",
                                                        temperature=0.0, max_new_tokens=tokens, ignore_eos=True):
                    done += chunk.token_count
            return done

        return sum(await asyncio.gather(*(one_client(c) for c in range(clients))))


async def scrape_every_second(port: int, stop: asyncio.Event) -> int:
    scrapes = 0
    while not stop.is_set():
        await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read())
        scrapes += 1
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass
    return scrapes


async def measure(server: ServerProcess, metrics: bool, args) -> dict:
    await closed_loop(server.address, args.clients, 1, 8)  # warm-up
    stop = asyncio.Event()
    scraper = asyncio.create_task(scrape_every_second(server.http_port, stop)) if metrics else None
    started = time.perf_counter()
    generated = await closed_loop(server.address, args.clients, args.requests, args.tokens)
    seconds = time.perf_counter() - started
    stop.set()
    scrapes = await scraper if scraper else 0
    return {"metrics": metrics, "tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds,
            "scrapes": scrapes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=6, help="per client")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--server-arg", action="append", default=[], help="extra chat-server flag (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/metrics_cost.json")
    args = parser.parse_args()
    runs = []
    for pair in range(args.pairs):
        for metrics in ((True, False) if pair % 2 == 0 else (False, True)):
            flag = "--metrics" if metrics else "--no-metrics"
            with ServerProcess(flag, "--log-level", "INFO", *args.server_arg) as server:
                server.wait_serving(timeout=600)
                run = asyncio.run(measure(server, metrics, args))
                server.stop()
            print(json.dumps(run), flush=True)
            runs.append(run)
    on = [r["tokens_per_s"] for r in runs if r["metrics"]]
    off = [r["tokens_per_s"] for r in runs if not r["metrics"]]
    summary = {"metrics_on_tokens_per_s": statistics.fmean(on), "metrics_off_tokens_per_s": statistics.fmean(off),
               "on_over_off": statistics.fmean(on) / statistics.fmean(off)}
    print(json.dumps(summary))
    report = {"clients": args.clients, "requests_per_client": args.requests, "tokens": args.tokens,
              "server_args": args.server_arg, "runs": runs, **summary}
    results.save("metrics_cost", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
