"""`--kv-cache-tokens auto`: how many KV positions the pool gets.

On CUDA the pool takes what is left of the GPU after the weights and a warm-up forward of one prompt chunk
(the peak of a step's activations), times a utilization share, as vLLM's `gpu_memory_utilization` does. On
CPU, where memory is the host's and grows only as blocks are used, `auto` means the default, 65536.
"""

from __future__ import annotations

import logging

import torch

from service.engine.model_runner import cache_shape

log = logging.getLogger(__name__)

CPU_DEFAULT = 65536
UTILIZATION = 0.9  # of the GPU memory free after the weights, the rest left to other allocations


def bytes_per_position(config, dtype: torch.dtype) -> int:
    """KV bytes one position takes: keys and values of every layer."""
    layers, kv_heads, head_dim = cache_shape(config)
    return layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def pool_tokens(free_bytes: int, activation_bytes: int, per_position: int, block_size: int,
                utilization: float = UTILIZATION) -> int:
    """Positions (whole blocks) that fit in `utilization` of `free_bytes` once a step's activations are set
    aside."""
    budget = int(free_bytes * utilization) - activation_bytes
    return max(0, budget // (per_position * block_size)) * block_size


@torch.inference_mode()
def warm_up_peak(model, tokens: int) -> int:
    """Bytes a forward of `tokens` prompt tokens allocates at its peak, beyond what was allocated before."""
    device = model.device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
    model.get_output_embeddings()(model.base_model(input_ids=ids).last_hidden_state[:, -1])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak


def auto_kv_tokens(model, chunk_tokens: int, block_size: int) -> int:
    """The pool size `auto` picks for `model` on its device (logged)."""
    if model.device.type != "cuda":
        log.info("--kv-cache-tokens auto on %s: %d positions (the default; memory grows as blocks are used)",
                 model.device.type, CPU_DEFAULT)
        return CPU_DEFAULT
    activations = warm_up_peak(model, chunk_tokens)
    free, total = torch.cuda.mem_get_info(model.device)
    per_position = bytes_per_position(model.config, model.dtype)
    tokens = pool_tokens(free, activations, per_position, block_size)
    log.info("--kv-cache-tokens auto: %d positions (%.2f GiB at %d bytes each) of %.2f GiB free (%.2f GiB total) "
             "after the weights, %.0f %% of it, less %.2f GiB for a %d-token step's activations", tokens,
             tokens * per_position / 2**30, per_position, free / 2**30, total / 2**30, UTILIZATION * 100,
             activations / 2**30, chunk_tokens)
    if tokens < block_size:
        raise RuntimeError(f"--kv-cache-tokens auto: no GPU memory left for the KV pool ({free / 2**30:.2f} GiB "
                           f"free after the weights); set --kv-cache-tokens or use a smaller model")
    return tokens
