"""`--quantize`: weight-only int8 or int4 for the linear layers of any loaded model, ChatGLM2 included.

int4 packs each weight with group size 32 (asymmetric min/max, 32 divides every hidden size we serve,
576 included) into `Int4Linear`; int8 (`Int8Linear`) is symmetric, one scale per group of 32 on our own kernel
(service/models/quant/kernels), one per output row on torch's `_weight_int8pack_mm`. Embeddings and norms stay in the
model's dtype. Our kernels take float32 inputs and return float32; torch's CPU kernels take bfloat16 inputs (the
int4 one is ~50x slower on float32 inputs), so a float32 model feeds them bfloat16 and gets float32 back: the rest
of the step (norms, rotary, attention) stays in float32.
"""

from __future__ import annotations

import collections
import enum
import logging

import torch
from torch import nn

from service.config import Quantization
from service.models.quant import kernels
from service.models.quant.int4 import DenseCopy, Int4Linear, Kernel, kernel_fits, quantize_int4

log = logging.getLogger(__name__)

INT4_GROUP = 32  # asymmetric min/max per 32 inputs (per 64 read 10 % fewer bytes; SmolLM2 went 25.9 -> 39.6 ppl)
QUANTIZE_ROWS = 4096  # rows quantized at a time: a multiple of the int4 packing's 64-row blocks


class WeightFormat(enum.IntEnum):
    """How a model's linear layers store their weights (values as chat.v1's WeightFormat)."""

    DENSE = 1
    INT8 = 2
    INT4 = 3


def weight_format(model: nn.Module) -> WeightFormat:
    """The format holding most of `model`'s linear weights, by weight count."""
    counts = collections.Counter()
    for module in model.modules():
        if isinstance(module, Int4Linear):
            counts[WeightFormat.INT4] += module.in_features * module.out_features
        elif isinstance(module, Int8Linear):
            counts[WeightFormat.INT8] += module.in_features * module.out_features
        elif isinstance(module, nn.Linear):
            counts[WeightFormat.DENSE] += module.weight.numel()
    return max(counts, key=counts.get) if counts else WeightFormat.DENSE


class Int8Linear(DenseCopy, nn.Module):
    """y = x @ W.T + bias, W int8. Our own kernel (`Kernel.OWN`): one float16 scale per group of 32 inputs
    (GGUF's Q8_0, which it reads back exactly); torch's `_weight_int8pack_mm`: one scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 kernel: Kernel | None = None):
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        if kernel is None:
            kernel = Kernel.OWN if kernels.fits(self.out_features, self.in_features, weight.device) else Kernel.TORCH
        self.kernel = kernel
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        if kernel is Kernel.OWN:
            groups = weight.view(self.out_features, -1, kernels.GROUP)  # [out, in / 32, 32]
            scale = (groups.abs().amax(dim=-1) / 127).half().float()  # what the kernel reads
            divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: q = 0
            q = (groups / divisor[..., None]).round().clamp(-127, 127)
            packed, scales = kernels.pack_q8(q.view_as(weight).to(torch.int8), scale)
        else:
            scale = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # [out]
            packed = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            scales = scale.to(compute_dtype)
        # OWN: kernels.pack_q8's [out / 16, in / 4, 64] and [out / 16, in / 32, 16]; TORCH: [out, in] and [out]
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)

    @classmethod
    def from_packed(cls, packed: torch.Tensor, scales: torch.Tensor, in_features: int, out_features: int,
                    bias: torch.Tensor | None, kernel: Kernel) -> Int8Linear:
        """A layer holding weights packed already (by another Int8Linear of `kernel`), as they are."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.kernel = in_features, out_features, kernel
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        layer.register_buffer("packed", packed)
        layer.register_buffer("scales", scales)
        return layer

    @classmethod
    def concat(cls, layers: list[Int8Linear]) -> Int8Linear | None:
        """One layer computing the concatenation of `layers`' outputs (same input), or None."""
        first = layers[0]
        biased = {x.bias is not None for x in layers if isinstance(x, Int8Linear)}
        if len(biased) != 1 or not all(isinstance(x, Int8Linear) and x.kernel is first.kernel
                                       and x.in_features == first.in_features for x in layers):
            return None
        bias = torch.cat([x.bias for x in layers]) if biased == {True} else None
        return cls.from_packed(torch.cat([x.packed for x in layers]), torch.cat([x.scales for x in layers]),
                               first.in_features, sum(x.out_features for x in layers), bias, first.kernel)

    def packed_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """flat [rows, in] -> [rows, out] through the int8 weights: float32 from ours, the scales' dtype from
        torch's (no bias)."""
        if self.kernel is Kernel.OWN:
            return kernels.q8_matmul(flat, self.packed, self.scales)
        return torch.ops.aten._weight_int8pack_mm(flat.to(self.scales.dtype).contiguous(), self.packed, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out], in x's dtype."""
        y = self.matmul(x.reshape(-1, self.in_features)).to(x.dtype)  # [tokens, out]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


def _kernel_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if device.type == "cpu" else dtype


def quantize_linear(layer: nn.Linear, mode: Quantization) -> nn.Module:
    weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    compute = _kernel_dtype(weight.device, weight.dtype)
    if mode == Quantization.INT8:
        if weight.device.type != "cpu":  # torch's int8 kernel off the CPU has no tensor cores: not chosen unmeasured
            return layer
        return Int8Linear(weight, bias, compute)
    if not kernels.fits(*weight.shape, weight.device) and not kernel_fits(*weight.shape, INT4_GROUP, weight.device,
                                                                          compute):
        return layer  # no int4 kernel for this shape or device: stays dense, as it was
    # a block of rows at a time: quantizing and packing need float32 and int32 copies of what they work on
    # (an LM head of 65024 x 4096 would take 3 GB more at once); packed rows concatenate on 64-row blocks
    parts = []
    for rows in weight.split(QUANTIZE_ROWS):
        q, scale, zero = quantize_int4(rows, INT4_GROUP)
        parts.append(Int4Linear.from_quantized(q, scale, zero, INT4_GROUP, device=weight.device,
                                               compute_dtype=compute))
    layer = parts[0] if len(parts) == 1 else Int4Linear.concat(parts)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device=weight.device, dtype=compute), requires_grad=False)
    return layer


def quantize_model(model: nn.Module, mode: Quantization) -> int:
    """Replace every nn.Linear of `model` (the LM head included) by its quantized form, one layer at a time so
    that memory stays near one dense layer above the result. Returns how many were replaced; a layer no int4
    kernel takes on its device stays dense, and the log says how many did. If none could be quantized (int4 or
    int8 on CUDA, which has no kernel for them here yet), asking for it is refused (ValueError), never silently
    dense."""
    if mode in (Quantization.NONE, Quantization.AUTO):
        return 0
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    replaced = 0
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        dense = getattr(owner, child)
        quantized = quantize_linear(dense, mode)
        replaced += quantized is not dense
        setattr(owner, child, quantized)
    if names and not replaced:
        device = next(model.parameters()).device
        raise ValueError(f"--quantize {mode.value}: no {mode.value} kernel takes this model's linear layers on "
                         f"{device.type}; use --quantize none")
    model.config.tie_word_embeddings = False  # the LM head now has its own (quantized) weight
    kept = len(names) - replaced
    log.info("quantized %d of %d linear layers to %s%s", replaced, len(names), mode.value,
             f" ({kept} stay dense: no kernel for their shape)" if kept else "")
    return replaced
