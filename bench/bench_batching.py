"""`make bench`: continuous batching against the one-request-at-a-time baseline, measured in one run.

1. baseline: plain `model.generate`, one request after another, same model, dtype and lengths;
2. the real server (a subprocess) driven over gRPC by C closed-loop StreamChat clients, C in 1..32;
3. gRPC overhead: the same batch through the engine called in-process;
4. prefix reuse: time to first token of a turn with a ~1500-token history, cold and warm.

Every request is greedy with EOS ignored, so every answer is exactly --new-tokens long.
Writes bench/results/batching-<stamp>.json, bench/results/latest.json and bench/results/batching.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import torch

from bench import report
from bench.cpu import cpu_flags, cpu_name
from bench.prompts import PROMPTS
from bench.server_process import ServerProcess
from client.chat_client import AsyncChatClient
from service.config import Limits
from service.core.types import GenerationRequest, SamplingParams
from service.engine.engine import KV_BLOCK_SIZE, Engine
from service.models.loader import load_model, resolve_device, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
KV_POOL_TOKENS = Limits().kv_cache_tokens  # the server runs with the default pool


@dataclass
class Figures:
    """One configuration's measurements."""

    label: str
    clients: int
    requests: int
    completion_tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    errors: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds

    def summary(self) -> dict:
        def pct(values, q):
            return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else (values or [0])[0]

        return {
            "label": self.label, "clients": self.clients, "requests": self.requests, "errors": self.errors,
            "completion_tokens": self.completion_tokens, "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "ttft_p50_s": round(pct(self.ttft, 50), 4), "ttft_p95_s": round(pct(self.ttft, 95), 4),
            "itl_p50_s": round(pct(self.itl, 50), 4), "itl_p95_s": round(pct(self.itl, 95), 4),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


class PeakRss:
    """Polls a process's RSS in the background."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.1)

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._stop.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


# ---- baseline: model.generate, one request at a time ------------------------------------------------------


class Timestamps:
    """A generate() streamer that records when each new token appears."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # the first put is the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.inference_mode()
def run_baseline(loaded, prompts: list[str], new_tokens: int) -> Figures:
    model, tokenizer = loaded.model, loaded.tokenizer
    figures = Figures("baseline generate()", 1, len(prompts), 0, 0.0)
    with PeakRss(os.getpid()) as rss:
        started = time.perf_counter()
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode_chat(prompt, (), None)], device=model.device)
            stamps = Timestamps()
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, streamer=stamps,
                                 pad_token_id=min(tokenizer.eos_token_ids))
            figures.completion_tokens += out.shape[1] - ids.shape[1]
            figures.ttft.append(stamps.times[0] - t0)
            figures.itl += [b - a for a, b in zip(stamps.times, stamps.times[1:], strict=False)]
        figures.seconds = time.perf_counter() - started
    figures.peak_rss_mb = rss.peak_mb
    return figures


# ---- the server over gRPC -----------------------------------------------------------------------------------


def start_server(args) -> ServerProcess:
    return ServerProcess.serving("--dtype", args.dtype, "--quantize", args.quantize, "--max-batch-size",
                                 str(args.max_batch_size), "--log-level", "INFO")


async def one_stream(client: AsyncChatClient, prompt: str, new_tokens: int, figures: Figures) -> None:
    t0 = time.perf_counter()
    last = None
    try:
        async for chunk in client.stream_chunks(prompt, temperature=0.0, max_new_tokens=new_tokens,
                                                ignore_eos=True):
            if not chunk.token_count:
                continue
            now = time.perf_counter()
            if last is None:
                figures.ttft.append(now - t0)
                if chunk.token_count > 1:
                    figures.itl += [0.0] * (chunk.token_count - 1)
            else:
                figures.itl += [(now - last) / chunk.token_count] * chunk.token_count
            last = now
            figures.completion_tokens += chunk.token_count
    except grpc.aio.AioRpcError:
        figures.errors += 1


async def drive(address: str, clients: int, rounds: int, new_tokens: int, pid: int) -> Figures:
    figures = Figures(f"server C={clients}", clients, clients * rounds, 0, 0.0)

    async def closed_loop(index: int, client: AsyncChatClient):
        for r in range(rounds):
            await one_stream(client, PROMPTS[(index + r) % len(PROMPTS)], new_tokens, figures)

    async with AsyncChatClient(address, timeout=600) as client:
        with PeakRss(pid) as rss:
            started = time.perf_counter()
            await asyncio.gather(*(closed_loop(i, client) for i in range(clients)))
            figures.seconds = time.perf_counter() - started
    figures.peak_rss_mb = rss.peak_mb
    return figures


class KvSampler:
    """Polls the server's /metrics while a load runs: KV positions computed against positions the blocks held
    hold (blocks x 16), the share of the KV memory held that is really used."""

    def __init__(self, http_port: int):
        self.url = f"http://127.0.0.1:{http_port}/metrics"
        self.ratios: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        while not self._stop.wait(0.25):
            values = {}
            with urllib.request.urlopen(self.url, timeout=5) as response:
                for family in text_string_to_metric_families(response.read().decode()):
                    for sample in family.samples:
                        values[sample.name, sample.labels.get("state", "")] = sample.value
            held = values.get(("chat_kv_blocks", "held"), 0) * KV_BLOCK_SIZE
            used = values.get(("chat_kv_cache_usage_ratio", ""), 0) * self.pool
            if held:
                self.ratios.append(used / held)

    def __enter__(self):
        self.pool = KV_POOL_TOKENS
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        ratios = self.ratios or [0.0]
        return {"samples": len(self.ratios), "used_over_held_mean": round(statistics.fmean(ratios), 3),
                "used_over_held_min": round(min(ratios), 3)}


# ---- the engine in-process (no gRPC) ------------------------------------------------------------------------


async def run_engine_direct(device, precision, clients: int, new_tokens: int, max_batch_size: int) -> Figures:
    worker = ThreadPoolExecutor(max_workers=1)  # load and run on one thread, as the server does
    loaded = await asyncio.get_running_loop().run_in_executor(worker, load_model, "", device, precision.dtype,
                                                              precision.quantize)
    engine = Engine(loaded, Limits(max_batch_size=max_batch_size))
    engine.start(worker)
    figures = Figures(f"engine direct C={clients}", clients, clients, 0, 0.0)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                            repetition_penalty=1.0, ignore_eos=True)

    async def one(index: int):
        prompt = loaded.tokenizer.encode_chat(PROMPTS[index % len(PROMPTS)], (), None)
        t0 = time.perf_counter()
        first = True
        async for chunk in engine.submit(GenerationRequest(f"direct-{index}", prompt, params)).stream():
            if chunk.token_count and first:
                figures.ttft.append(time.perf_counter() - t0)
                first = False
            figures.completion_tokens += chunk.token_count

    await one(0)  # warm-up, untimed, as the server warms up before SERVING
    figures.ttft.clear()
    figures.completion_tokens = 0
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    figures.seconds = time.perf_counter() - started
    engine.stop()
    return figures


def engine_direct_summary(device, precision, clients: int, new_tokens: int, max_batch_size: int) -> dict:
    """run_engine_direct in a process of its own: in this one the baseline has already run torch on the main
    thread, and a second thread's torch work would start a second OpenMP pool competing for the cores (it read
    168 tok/s against the server's 276 that way), which is not what the server does."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_direct_in_child, device, precision, clients, new_tokens, max_batch_size).result()


def _direct_in_child(device, precision, clients: int, new_tokens: int, max_batch_size: int) -> dict:
    return asyncio.run(run_engine_direct(device, precision, clients, new_tokens, max_batch_size)).summary()


# ---- prefix reuse -----------------------------------------------------------------------------------------


def long_history(target_tokens: int, tokenizer) -> list[tuple[str, str]]:
    """Made-up turns until the history is about `target_tokens` tokens."""
    history: list[tuple[str, str]] = []
    n = 0
    while len(tokenizer.encode_chat("ok", [_turn(h) for h in history], None)) < target_tokens:
        n += 1
        history.append((f"Tell me fact number {n} about the ocean.",
                        f"Fact {n}: the ocean covers most of the planet, holds {n * 7} kinds of fish in this "
                        f"story, and its waves carry energy across thousands of kilometres before they break."))
    return history


def _turn(pair):
    from service.models.base import Turn

    return Turn(user=pair[0], assistant=pair[1])


async def measure_prefix_reuse(address: str, tokenizer) -> dict:
    history = long_history(1500, tokenizer)
    tokens = len(tokenizer.encode_chat("What was fact 3?", [_turn(h) for h in history], None))

    async def ttft(prompt, hist):
        t0, first = time.perf_counter(), None
        async for chunk in client.stream_chunks(prompt, hist, temperature=0.0, max_new_tokens=8):
            if chunk.token_count and first is None:
                first = time.perf_counter() - t0
        return first

    async with AsyncChatClient(address, timeout=600) as client:
        cold = await ttft("What was fact 3?", history)
        warm_new_question = await ttft("What was fact 5?", history)
        answer = await client.chat_response("What was fact 7?", history, temperature=0.0, max_new_tokens=16)
        next_turn = history + [("What was fact 7?", answer.text)]
        warm_next_turn = await ttft("And fact 8?", next_turn)
    return {"history_tokens": tokens, "ttft_cold_s": round(cold, 4),
            "ttft_warm_new_last_message_s": round(warm_new_question, 4),
            "ttft_warm_next_turn_s": round(warm_next_turn, 4),
            "ratio_new_last_message": round(warm_new_question / cold, 3),
            "ratio_next_turn": round(warm_next_turn / cold, 3)}


# ---- report -----------------------------------------------------------------------------------------------


def machine() -> dict:
    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def plot(rows: list[dict], baseline: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(clients, [r["tokens_per_s"] for r in rows], "o-", label="server (gRPC)")
    left.axhline(baseline["tokens_per_s"], color="gray", linestyle="--", label="baseline generate()")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="completion tokens/s", title="Throughput")
    left.set_xticks(clients, [str(c) for c in clients])
    left.legend()
    right.plot(clients, [r["ttft_p50_s"] for r in rows], "o-", label="p50")
    right.plot(clients, [r["ttft_p95_s"] for r in rows], "s--", label="p95")
    right.axhline(baseline["ttft_p50_s"], color="gray", linestyle="--", label="baseline p50")
    right.set(xscale="log", xlabel="concurrent clients", ylabel="seconds", title="Time to first token")
    right.set_xticks(clients, [str(c) for c in clients])
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def print_table(baseline: dict, rows: list[dict]) -> None:
    head = f"{'config':<22}{'tok/s':>9}{'x base':>8}{'TTFT p50':>10}{'p95':>8}{'ITL p50':>9}{'p95':>8}" \
           f"{'x base':>8}{'RSS MB':>8}{'err':>5}"
    print(head)
    for r in [baseline] + rows:
        print(f"{r['label']:<22}{r['tokens_per_s']:>9.1f}{r['tokens_per_s'] / baseline['tokens_per_s']:>8.2f}"
              f"{r['ttft_p50_s']:>10.3f}{r['ttft_p95_s']:>8.3f}{r['itl_p50_s']:>9.4f}{r['itl_p95_s']:>8.4f}"
              f"{r['itl_p50_s'] / baseline['itl_p50_s']:>8.2f}{r['peak_rss_mb']:>8.0f}{r['errors']:>5}")


async def main_async(args) -> dict:
    device = resolve_device("auto")
    precision = resolve_precision("", args.dtype, args.quantize, device)
    dtype = precision.dtype
    loaded = load_model("", device, dtype, precision.quantize)
    print(f"model {loaded.name} on {device} as {dtype}; {args.new_tokens} new tokens per request", flush=True)
    baseline = run_baseline(loaded, PROMPTS[: args.baseline_requests], args.new_tokens).summary()
    print(f"baseline: {baseline['tokens_per_s']:.1f} tok/s", flush=True)
    direct = engine_direct_summary(device, precision, args.overhead_clients, args.new_tokens, args.max_batch_size)
    tokenizer = loaded.tokenizer
    del loaded

    server = start_server(args)
    address, pid = server.address, server.proc.pid
    try:
        rows = []
        kv = None
        for clients in args.clients:
            rounds = args.rounds
            if clients == 16 and server.http_port:
                with KvSampler(server.http_port) as sampler:
                    figures = await drive(address, clients, rounds, args.new_tokens, pid)
                kv = sampler.summary()
                print(f"C=16 KV positions used / held: mean {kv['used_over_held_mean']}, min "
                      f"{kv['used_over_held_min']} ({kv['samples']} samples)", flush=True)
            else:
                figures = await drive(address, clients, rounds, args.new_tokens, pid)
            rows.append(figures.summary())
            print(f"C={clients}: {rows[-1]['tokens_per_s']:.1f} tok/s, TTFT p50 {rows[-1]['ttft_p50_s']:.3f}s",
                  flush=True)
        over_grpc = (await drive(address, args.overhead_clients, 1, args.new_tokens, pid)).summary()
        prefix = await measure_prefix_reuse(address, tokenizer)
    finally:
        server.stop(timeout=60)

    overhead = 1 - over_grpc["tokens_per_s"] / direct["tokens_per_s"]
    by_c = {r["clients"]: r for r in rows}

    def ratio(top, bottom, digits=3):
        return round(top / bottom, digits) if top is not None and bottom else None

    def tps(clients):
        return by_c[clients]["tokens_per_s"] if clients in by_c else None

    targets = {
        "C16_throughput_x_baseline": ratio(tps(16), baseline["tokens_per_s"]),
        "C32_over_C16": ratio(tps(32), tps(16)),
        "C1_throughput_x_baseline": ratio(tps(1), baseline["tokens_per_s"]),
        "C16_ttft_p50_s": by_c[16]["ttft_p50_s"] if 16 in by_c else None,
        "grpc_overhead_fraction": round(overhead, 4),
        "prefix_reuse_ttft_ratio": prefix["ratio_new_last_message"],
        "C16_kv_used_over_held": kv["used_over_held_mean"] if kv else None,
        "errors": sum(r["errors"] for r in rows),
    }
    return {"machine": machine(), "dtype": str(dtype), "quantize": args.quantize, "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "baseline": baseline, "server": rows, "overhead": {"engine_direct": direct, "grpc": over_grpc,
                                                                  "fraction": round(overhead, 4)},
            "prefix_reuse": prefix, "kv_memory_C16": kv, "targets": targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--baseline-requests", type=int, default=3)
    parser.add_argument("--overhead-clients", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantize", default="auto")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    report.save("batching", result)
    plot(result["server"], result["baseline"], RESULTS / "batching.png")
    print()
    print_table(result["baseline"], result["server"])
    overhead = result["overhead"]
    print(f"\ngRPC overhead at C={args.overhead_clients}: engine direct "
          f"{overhead['engine_direct']['tokens_per_s']:.1f} tok/s, over gRPC {overhead['grpc']['tokens_per_s']:.1f} "
          f"tok/s -> {100 * overhead['fraction']:.1f}%")
    print(f"prefix reuse: {json.dumps(result['prefix_reuse'])}")
    print(f"targets: {json.dumps(result['targets'])}")
    print(f"machine: {json.dumps(result['machine'])}")


if __name__ == "__main__":
    main()
