"""A 20,000-token prompt arriving while another stream decodes: chunked prefill against prefill in one piece.

Runs the engine in-process on the tiny chatglm2-6b-32k fixture (its context raised to 32768 for this), once per
chunk size in a fresh subprocess so each peak RSS is its own, and prints: the running stream's inter-token
latency (p50 and worst) while the long prompt is computed, the long prompt's time to first token, and peak RSS.

    python -m scripts.measure_long_prefill            # both, as a table (bench/results/long-prefill.json)
    python -m scripts.measure_long_prefill --chunk 512
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


FIXTURE = ROOT / "tests" / "data" / "chatglm2-32k-tiny"
CONTEXT = 32768
LONG = 20_000


def peak_rss_sampler(stop: threading.Event, peak: list[float]) -> None:
    import psutil

    process = psutil.Process()
    while not stop.is_set():
        peak[0] = max(peak[0], process.memory_info().rss / 2**20)
        time.sleep(0.01)


async def measure(chunk: int) -> dict:
    import torch

    from service.config import Limits
    from service.engine.engine import Engine
    from service.engine.request import GenerationRequest, SamplingParams
    from service.models.loader import load_model

    loaded = dataclasses.replace(load_model(str(FIXTURE), torch.device("cpu"), torch.float32),
                                 context_length=CONTEXT)
    engine = Engine(loaded, Limits(max_batch_size=2, max_queued_requests=2, kv_cache_tokens=2 * CONTEXT,
                                   prefill_chunk_tokens=chunk))
    engine.start()
    greedy = dict(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, ignore_eos=True)
    running = engine.submit(GenerationRequest("running", [5, 6, 7, 8], SamplingParams(max_new_tokens=20_000, **greedy)))
    arrivals: list[float] = []
    stream = running.stream()
    for _ in range(20):  # under way
        await anext(stream)
    stop, peak = threading.Event(), [0.0]
    threading.Thread(target=peak_rss_sampler, args=(stop, peak), daemon=True).start()
    prompt = [(i * 7919) % 900 + 20 for i in range(LONG)]
    started = time.perf_counter()
    long = engine.submit(GenerationRequest("long", prompt, SamplingParams(max_new_tokens=1, **greedy)))

    async def read_running():
        async for _ in stream:
            arrivals.append(time.perf_counter())
            if long_done.is_set():
                return

    long_done = asyncio.Event()
    reader = asyncio.create_task(read_running())
    async for _ in long.stream():
        pass
    ttft = time.perf_counter() - started
    long_done.set()
    running.cancel()
    await reader
    stop.set()
    engine.stop()
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:], strict=False)) or [ttft]
    return {"prefill_chunk_tokens": chunk, "long_prompt_tokens": LONG, "long_ttft_s": round(ttft, 2),
            "running_tokens_during_prefill": len(arrivals), "running_itl_p50_s": round(gaps[len(gaps) // 2], 4),
            "running_itl_worst_s": round(gaps[-1], 2), "peak_rss_mb": round(peak[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunk", type=int, help="measure one chunk size in this process")
    args = parser.parse_args()
    if args.chunk:
        print(json.dumps(asyncio.run(measure(args.chunk))))
        return
    rows = []
    for chunk in (512, CONTEXT):  # CONTEXT: the whole prompt in one piece
        done = subprocess.run([sys.executable, __file__, "--chunk", str(chunk)], capture_output=True, text=True,
                              check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    out = ROOT / "bench" / "results" / "long-prefill.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"{'chunk':>7}{'TTFT s':>9}{'ITL p50 s':>11}{'ITL worst s':>13}{'tokens':>8}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['prefill_chunk_tokens']:>7}{r['long_ttft_s']:>9}{r['running_itl_p50_s']:>11}"
              f"{r['running_itl_worst_s']:>13}{r['running_tokens_during_prefill']:>8}{r['peak_rss_mb']:>13}")


if __name__ == "__main__":
    main()
