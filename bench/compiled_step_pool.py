"""Does a compiled decode step cost more with a larger KV pool? It should not: a step touches only its rows'
blocks. Inductor, given the K/V write as an indexed assignment into the pool, copied the whole pool every step;
service/engine/kv_cache.py's `write_kv` op is what keeps the write in place.

    python -m bench.compiled_step_pool            # a tiny random Llama on CPU, torch's ops (what a GPU compiles)

For a small pool and a large one it builds the runner, compiles its decode step with inductor, and times decode
steps of one row compiled and eager, side by side in one run (medians of --steps steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.cpu import cpu_flags, cpu_name
from service.engine.block_manager import BlockManager
from service.engine.model_runner import ModelRunner, StepRow
from service.engine.step_graphs import CompiledSteps


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def step_ms(runner: ModelRunner, table: list[int], ids: list[int], steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        ids.append(int(runner.run([StepRow(table, len(ids) - 1, ids[-1:])])[0].argmax()))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(model, blocks: int, steps: int) -> dict:
    runner = ModelRunner(model, num_blocks=blocks, block_size=16, max_rows=1, max_context=512)
    runner.fast.ops = None  # torch's ops, as on a GPU (our CPU kernels write the pool outside any graph)
    compiled = CompiledSteps(runner.decode_step, runner.buckets, runner.device, 16)
    manager = BlockManager(runner.kv.num_blocks, 16)
    table = manager.allocate([], 64)
    runner.kv.zero(manager.take_fresh())
    ids = [4, 8, 15]
    ids.append(int(runner.run([StepRow(table, 0, ids)])[0].argmax()))
    eager = step_ms(runner, table, ids, steps)
    runner.steps = compiled
    step_ms(runner, table, ids, 3)  # warm-up
    return {"pool_mb": runner.kv.data.numel() * runner.kv.data.element_size() / 1e6, "eager_ms": eager,
            "compiled_ms": step_ms(runner, table, ids, steps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 32768])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"CPU {cpu_name()} ({' '.join(cpu_flags())}), torch threads {torch.get_num_threads()}:")
    model = tiny_llama()
    for blocks in args.blocks:
        found = measure(model, blocks, args.steps)
        print(f"  pool {found['pool_mb']:.1f} MB: eager step {found['eager_ms']:.2f} ms, compiled step "
              f"{found['compiled_ms']:.2f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
