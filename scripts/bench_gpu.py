"""The engine on a GPU, with ChatGLM2-6B's real shape and random weights: decode speed against the roofline.

    python -m scripts.bench_gpu [--device cuda] [--dtype bfloat16] [--streams 1 16 64] [--new-tokens 64]

Nothing is downloaded and nothing is read from disk but the fixture tokenizer: the model is built in memory
(`make_random_chatglm2.py`'s shape: 28 layers, hidden 4096, 32 heads, 2 KV groups, FFN 13696, vocabulary
65024) and filled with N(0, 0.02) weights, so the text is gibberish and every timing is real. It prints and
writes (bench/results/gpu-<stamp>.json), for each way of running decode steps (`--modes`: eager; `graphs`, the
eager step captured as CUDA graphs; `compiled-graphs`, compiled by inductor and then captured, what `--compile
auto` runs on a GPU), each measured in this one run:

* the memory bandwidth, measured with a 1 GiB device-to-device copy (bytes read plus written over the time),
  and the weight bytes a token reads (every parameter but the input embedding);
* single-stream decode tok/s, and that as a fraction of the roofline (bandwidth / weight bytes);
* tok/s of the engine with 1, 16 and 64 concurrent greedy streams (prefill included), `--new-tokens` each, and
  their time to first token (p50 and worst);
* the start-up cost of the mode (building the runner: capture, compile) and the peak GPU memory it reached.

Only dense weights run: `--quantize int8` and `int4` are refused on CUDA until a GPU kernel is measured against
bfloat16 (docs/engine.md, Weights), so there is no quantized mode to measure yet.

`--device cpu --layers 1` runs the same code on a CPU (the test suite does, to keep it working); figures from
it say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import torch

from scripts.make_random_chatglm2 import FIXTURE, Spec, original_config
from service.config import Limits
from service.engine.engine import KV_BLOCK_SIZE, Engine
from service.engine.model_runner import ModelRunner
from service.engine.request import GenerationRequest, SamplingParams
from service.engine.solo import Solo
from service.engine.step_graphs import StepMode
from service.models.base import LoadedModel
from service.models.chatglm2 import build_empty_model, load_tokenizer, parse_shape, to_glm_config

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Tell me about the history of the printing press."
WEIGHT_STD = 0.02
# eager first (cheap), then what --compile auto runs on a GPU, then graphs alone: a run cut short loses the last
MODES = {"eager": StepMode.EAGER, "compiled-graphs": StepMode.COMPILED_GRAPHS, "graphs": StepMode.GRAPHS}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def random_chatglm2(layers: int, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """ChatGLM2-6B's architecture (`layers` of its 28) with random weights, built on `device`."""
    from transformers import GenerationConfig

    shape = parse_shape(original_config(Spec(layers=layers)))
    tokenizer = load_tokenizer(FIXTURE, shape.vocab)
    model = build_empty_model(to_glm_config(shape, tokenizer.eos_id, tokenizer.pad_id), dtype, device)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, WEIGHT_STD, generator=generator)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=f"ChatGLM2-6B shape, {layers} layers, random",
                       context_length=shape.seq_length)


def copy_bandwidth(device: torch.device, size: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read plus write)."""
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * size * repeats / (time.perf_counter() - start)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding (one row of it)."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)


def peak_memory_gb(device: torch.device) -> float | None:
    """The peak GPU memory allocated since the last reset, or None off a GPU."""
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@torch.inference_mode()
def single_stream(loaded: LoadedModel, mode: StepMode, steps: int, capacity: int) -> tuple[float, float]:
    """(decode tok/s of one stream through the model runner, seconds building the runner: capture, compile)."""
    blocks = -(-capacity // KV_BLOCK_SIZE)
    started = time.perf_counter()
    runner = ModelRunner(loaded.model, num_blocks=blocks + 1, block_size=KV_BLOCK_SIZE, max_rows=1,
                         max_context=capacity, step_mode=mode)
    built = time.perf_counter() - started
    ids = loaded.tokenizer.encode_chat(PROMPT, (), None)
    solo = Solo(runner)
    token = int(solo.prefill(ids).argmax())
    for _ in range(3):  # warm-up
        solo.decode(token)
    synchronize(runner.device)
    start = time.perf_counter()
    for _ in range(steps):
        token = int(solo.decode(token).argmax())  # reads the id: one sync a step
    return steps / (time.perf_counter() - start), built


async def engine_streams(loaded: LoadedModel, mode: StepMode, streams: list[int], new_tokens: int,
                         capacity: int) -> dict[int, dict]:
    """For each number of concurrent greedy streams: the engine's tok/s (prefill included) and its TTFTs."""
    from concurrent.futures import ThreadPoolExecutor

    largest = max(streams)
    limits = Limits(max_batch_size=largest, max_queued_requests=largest, kv_cache_tokens=largest * capacity)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-worker")
    engine = Engine(loaded, limits, step_mode=mode)
    engine.start(worker)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                            repetition_penalty=1.0, ignore_eos=True)
    ids = loaded.tokenizer.encode_chat(PROMPT, (), None)

    async def one(index: int) -> tuple[int, float]:
        """(tokens, seconds to the first token)."""
        tokens, started, first = 0, time.perf_counter(), None
        async for chunk in engine.submit(GenerationRequest(f"bench-{index}", list(ids), params)).stream():
            if first is None and chunk.token_count:
                first = time.perf_counter() - started
            tokens += chunk.token_count
        return tokens, first

    results = {}
    try:
        await one(-1)  # warm-up
        for count in streams:
            start = time.perf_counter()
            done = await asyncio.gather(*(one(i) for i in range(count)))
            seconds = time.perf_counter() - start
            ttfts = sorted(first for _, first in done)
            results[count] = {"tok_s": round(sum(tokens for tokens, _ in done) / seconds, 1),
                              "ttft_p50_s": round(ttfts[len(ttfts) // 2], 4), "ttft_max_s": round(ttfts[-1], 4)}
    finally:
        engine.stop()
    return results


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--layers", type=int, default=Spec.layers, help="fewer layers for a quick try")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--single-steps", type=int, default=64, help="decode steps timed for one stream")
    parser.add_argument("--capacity", type=int, default=1024, help="KV positions per stream")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/gpu-<stamp>.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: nothing to measure (use --device cpu --layers 1 to try the script)")
    loaded = random_chatglm2(args.layers, getattr(torch, args.dtype), device)
    bandwidth = copy_bandwidth(device)
    weights = weight_bytes_per_token(loaded.model)
    roofline = bandwidth / weights
    result = {
        "device": device_name(device), "dtype": args.dtype, "layers": args.layers, "torch": torch.__version__,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "weight_gb_per_token": round(weights / 1e9, 3),
        "roofline_tok_s": round(roofline, 1), "new_tokens": args.new_tokens, "modes": {},
    }
    print(f"{result['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, {weights / 1e9:.2f} GB of weights a "
          f"token, roofline {roofline:.1f} tok/s", flush=True)
    result["quantized"] = "none: --quantize int8 and int4 are refused on CUDA (docs/engine.md, Weights)"
    out = args.out or REPO / "bench" / "results" / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write(result, out)
    for name in args.modes:
        mode = MODES[name]
        if mode is not StepMode.EAGER and device.type != "cuda":
            print(f"{name}: skipped (CUDA only)")
            continue
        reset_peak(device)
        single, built = single_stream(loaded, mode, args.single_steps, args.capacity)
        streams = asyncio.run(engine_streams(loaded, mode, args.streams, args.new_tokens, args.capacity))
        result["modes"][name] = {"single_stream_tok_s": round(single, 2),
                                 "single_stream_of_roofline": round(single / roofline, 3),
                                 "runner_build_s": round(built, 1), "engine": {str(k): v for k, v in streams.items()},
                                 "peak_memory_gb": peak_memory_gb(device)}
        print(f"{name}: single stream {single:.1f} tok/s = {single / roofline:.0%} of the roofline (runner built in "
              f"{built:.1f} s); engine " + ", ".join(f"{k} streams {v['tok_s']:.1f} tok/s, TTFT p50 "
                                                      f"{v['ttft_p50_s'] * 1e3:.0f} ms" for k, v in streams.items())
              + f"; peak memory {peak_memory_gb(device)} GB", flush=True)
        write(result, out)  # after every mode: a run cut short by its time limit keeps what it measured
    write(result, out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
