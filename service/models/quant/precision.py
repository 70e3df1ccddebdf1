"""Choosing the dtype and quantization a model is served in, when the operator leaves them to `auto`.

Speed first where the hardware has it (bfloat16 on Ampere+ GPUs and AVX512-BF16/AMX CPUs), but never a choice
whose weights would not fit in the memory that is free: ChatGLM2-6B in float32 is 25 GB, more than a 24 GiB
machine holds. The choice and its reason go to the start-up log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from service.models.quant.quantize import Quantization

HEADROOM = 0.85  # weights may take at most this share of the free memory; activations and KV need the rest
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
QUANTIZED_BYTES = {Quantization.INT8: 1.1, Quantization.INT4: 0.6}  # per weight, scales included


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    quantize: Quantization
    reason: str


def count_weights(path: Path) -> int | None:
    """Roughly how many weights a checkpoint holds, from its files' sizes; None when it can't be told."""
    if path.is_file():
        return None  # GGUF: served packed as it is stored, so its file size is its size
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    if config.get("quantization_bit"):
        return None  # already packed: its file size is its size
    stored = {"float32": 4}.get(config.get("torch_dtype") or config.get("dtype"), 2)
    files = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    return sum(f.stat().st_size for f in files) // stored if files else None


def fast_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_fits(weights: int | None, mode: Quantization, dtype: torch.dtype, device: torch.device) -> None:
    """MemoryError, saying what was asked and what is free, when the weights would not fit in that form."""
    if weights is None:
        return
    need = weights * QUANTIZED_BYTES.get(mode, BYTES[dtype])
    budget = HEADROOM * free_bytes(device)
    if need > budget:
        form = mode.value if mode in QUANTIZED_BYTES else str(dtype).removeprefix("torch.")
        raise MemoryError(f"{weights / 1e9:.1f} B weights as {form} need {need / 2**30:.1f} GiB; "
                          f"{budget / 2**30:.1f} GiB of the {device.type}'s free memory may hold weights")


def choose(dtype: str, quantize: str, device: torch.device, weights: int | None, gguf: bool) -> Precision:
    """The dtype and quantization to load with. `dtype` / `quantize` are the flags ("auto" or a choice)."""
    mode = Quantization(quantize)
    on_cpu = device.type == "cpu"
    if mode in (Quantization.INT8, Quantization.INT4) and not on_cpu:
        raise ValueError(f"--quantize {mode.value}: no {mode.value} kernel on {device.type} here yet (weights run "
                         f"dense there); use --quantize none or auto")
    if mode == Quantization.AUTO:
        mode = Quantization.INT4 if gguf and on_cpu else Quantization.NONE
        why = ("the file's own 4-bit weights, packed" if gguf and on_cpu else
               f"the file's 4-bit weights dequantized (no int4 kernel on {device.type} yet)" if gguf else
               "dense weights")
    else:
        why = f"--quantize {mode.value}"
    if dtype != "auto":
        check_fits(weights, mode, getattr(torch, dtype), device)
        return Precision(getattr(torch, dtype), mode, f"--dtype {dtype}; {why}")
    if mode != Quantization.NONE and device.type == "cpu":
        # packed matmuls take bfloat16 inputs either way; float32 keeps norms, rotary and attention exact enough
        # (in bfloat16 they tipped SmolLM2's greedy answer to "What is the capital of France?" off Paris)
        check_fits(weights, mode, torch.float32, device)
        return Precision(torch.float32, mode, f"{why}; activations in float32")
    chosen = fast_dtype(device)
    budget = HEADROOM * free_bytes(device)
    if mode != Quantization.NONE:
        check_fits(weights, mode, chosen, device)
    if weights is None or mode != Quantization.NONE or weights * BYTES[chosen] <= budget:
        return Precision(chosen, mode, f"{why}; {str(chosen).removeprefix('torch.')} is fast on this {device.type}")
    for smaller in (torch.bfloat16, torch.float16):
        if BYTES[smaller] < BYTES[chosen] and weights * BYTES[smaller] <= budget:
            return Precision(smaller, mode, f"{why}; {weights * BYTES[chosen] / 2**30:.1f} GiB of "
                             f"{str(chosen).removeprefix('torch.')} weights would not fit in "
                             f"{budget / 2**30:.1f} GiB free")
    if device.type != "cpu":  # int8 and int4 have no kernel off the CPU here yet (quantize.quantize_model)
        raise MemoryError(f"{weights * BYTES[chosen] / 2**30:.1f} GiB of dense weights do not fit in "
                          f"{budget / 2**30:.1f} GiB free on {device.type}, and int8/int4 have no kernel there yet")
    for smaller_mode in (Quantization.INT8, Quantization.INT4):
        if weights * QUANTIZED_BYTES[smaller_mode] <= budget:
            return Precision(torch.float32 if device.type == "cpu" else chosen, smaller_mode,
                             f"dense weights would not fit in {budget / 2**30:.1f} GiB free; "
                             f"quantized to {smaller_mode.value}")
    raise MemoryError(f"{weights / 1e9:.1f} B weights do not fit in {budget / 2**30:.1f} GiB free, even as int4")
