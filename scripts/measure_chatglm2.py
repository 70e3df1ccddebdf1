"""Load a ChatGLM2 checkpoint with `load_chatglm2`; print load time, peak RSS, TTFT and decode speed as JSON.

    python -m scripts.measure_chatglm2 [--path /work/ckpt/chatglm2-6b-random] [--dtype bfloat16]

Works for every variant `make_random_chatglm2.py` writes (6b, 32k, int4). `model_gb` counts parameters and
buffers (an int4 model's packed weights are buffers); `peak_load_over_checkpoint` is the peak RSS while loading
divided by the checkpoint's size on disk.

Peak RSS while loading is the larger of a 20 ms psutil poll and `ru_maxrss` (the process peak so far,
which includes file pages of the memory-mapped shard being converted). Decoding is single-stream greedy
through the engine's model runner (the server's forward and paged KV cache), run for exactly `--new-tokens`
tokens (eos is not a stop here).
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
T = TypeVar("T")


class PeakRss:
    """Polls this process's RSS in a background thread while in the `with` block."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.peak_bytes = 0

    def _poll(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """`fn()` and its wall time in seconds."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def max_rss_bytes() -> int:
    """Peak RSS of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_generation(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int) -> dict[str, float]:
    """Time to first token (prefill + first argmax) and decode tokens/s over `new_tokens` more steps, through the
    engine's model runner (one sequence), as the server computes them."""
    from service.engine.engine import KV_BLOCK_SIZE
    from service.engine.model_runner import ModelRunner
    from service.engine.solo import Solo

    capacity = len(prompt_ids) + new_tokens + 1
    runner = ModelRunner(model, num_blocks=-(-capacity // KV_BLOCK_SIZE) + 1, block_size=KV_BLOCK_SIZE,
                         max_rows=1, max_context=capacity)
    solo = Solo(runner)
    logits, ttft = timed(lambda: solo.prefill(prompt_ids))
    token = int(logits.argmax())
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = int(solo.decode(token).argmax())
    decode_s = time.perf_counter() - start
    return {
        "ttft_s": ttft,
        "decode_tokens": new_tokens,
        "decode_s": decode_s,
        "decode_tok_per_s": new_tokens / decode_s,
        "forward": "ours (service/models/decoder.py)" if runner.fast is not None else "transformers modules",
    }


def checkpoint_bytes(path: Path) -> int:
    """Bytes of the weight files in a checkpoint directory."""
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".bin", ".safetensors"))


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path", type=Path, default=Path("/work/ckpt/chatglm2-6b-random"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                        help="quantize the linears while loading, as chat-server --quantize does")
    parser.add_argument("--prompt", default="你好，请介绍一下你自己。")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from bench.cpu import cpu_flags, cpu_name
    from service.models.chatglm2 import load_chatglm2
    from service.models.quant.quantize import Quantization, quantize_model

    torch.set_num_threads(args.threads)
    quantize = Quantization(args.quantize)

    def load():
        loaded = load_chatglm2(args.path, getattr(torch, args.dtype), torch.device("cpu"), quantize)
        quantize_model(loaded.model, quantize)  # the LM head, as the server's loader does
        return loaded

    rss_before = psutil.Process().memory_info().rss
    with PeakRss() as poll:
        loaded, load_s = timed(load)
    peak_load = max(poll.peak_bytes, max_rss_bytes())
    rss_after = psutil.Process().memory_info().rss
    prompt_ids = loaded.tokenizer.encode_chat(args.prompt, [], None)
    generation = measure_generation(loaded.model, prompt_ids, args.new_tokens)
    params = sum(p.numel() for p in loaded.model.parameters())
    report: dict[str, Any] = {
        "model": loaded.name,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "params": params,
        "checkpoint_gb": round(checkpoint_bytes(args.path) / GB, 2),
        "model_gb": round(model_bytes(loaded.model) / GB, 2),
        "load_s": round(load_s, 2),
        "rss_before_load_gb": round(rss_before / GB, 2),
        "peak_rss_load_gb": round(peak_load / GB, 2),
        "peak_load_over_checkpoint": round(peak_load / checkpoint_bytes(args.path), 2),
        "peak_load_increase_gb": round((peak_load - rss_before) / GB, 2),  # minus the interpreter and torch
        "rss_after_load_gb": round(rss_after / GB, 2),
        "prompt_tokens": len(prompt_ids),
        "ttft_s": round(generation["ttft_s"], 3),
        "decode_tokens": args.new_tokens,
        "decode_tok_per_s": round(generation["decode_tok_per_s"], 3),
        "forward": generation["forward"],
        "peak_rss_total_gb": round(max_rss_bytes() / GB, 2),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
