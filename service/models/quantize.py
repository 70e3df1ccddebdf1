"""`--quantize`: weight-only int8 or int4 for the linear layers of any loaded model, ChatGLM2 included.

int4 packs each weight with group size 32 (asymmetric min/max, 32 divides every hidden size we serve,
576 included) into `Int4Linear`; int8 stores one symmetric scale per output row and runs torch's
`_weight_int8pack_mm`. Embeddings and norms stay in the model's dtype. On CPU the packed kernels take bfloat16
inputs (the int4 one is ~50x slower on float32 inputs), so a float32 model feeds them bfloat16 and gets
float32 back: the rest of the step (norms, rotary, attention) stays in float32.
"""

from __future__ import annotations

import enum
import logging

import torch
from torch import nn

from service.models.int4 import DenseCopy, Int4Linear, kernel_fits, quantize_int4

log = logging.getLogger(__name__)

INT4_GROUP = 32
QUANTIZE_ROWS = 4096  # rows quantized at a time: a multiple of the int4 packing's 64-row blocks


class Quantization(str, enum.Enum):
    AUTO = "auto"  # a GGUF file's own 4-bit layers as packed int4; other models as they are
    NONE = "none"  # dense weights in the compute dtype (a GGUF file is dequantized)
    INT8 = "int8"
    INT4 = "int4"


class Int8Linear(DenseCopy, nn.Module):
    """y = x @ (q * scale[:, None]).T + bias, q int8 [out, in], one scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        weight = weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # [out]
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("q", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(compute_dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def packed_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """flat [rows, in] -> [rows, out] through the int8 kernel, in the scales' dtype (no bias)."""
        return torch.ops.aten._weight_int8pack_mm(flat.to(self.scale.dtype).contiguous(), self.q, self.scale)

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
        return Int8Linear(weight, bias, compute)
    if not kernel_fits(weight.shape[0], weight.shape[1], INT4_GROUP, weight.device, compute):
        return layer  # no int4 kernel for this shape or device: stays dense, as it was
    # a block of rows at a time: quantizing and packing need float32 and int32 copies of what they work on
    # (an LM head of 65024 x 4096 would take 3 GB more at once); packed rows concatenate on 64-row blocks
    parts = []
    for rows in weight.split(QUANTIZE_ROWS):
        q, scale, zero = quantize_int4(rows, INT4_GROUP)
        parts.append(Int4Linear.from_quantized(q, scale, zero, INT4_GROUP, device=weight.device,
                                               compute_dtype=compute))
    if len(parts) == 1:
        packed, pairs = parts[0].packed, parts[0].scales_and_zeros
    else:
        packed = torch.cat([p.packed for p in parts])
        pairs = torch.cat([p.scales_and_zeros for p in parts], dim=1)
    bias = None if bias is None else bias.to(device=weight.device, dtype=compute)
    return Int4Linear(packed, pairs, weight.shape[1], weight.shape[0], parts[0].group_size, bias)


def quantize_model(model: nn.Module, mode: Quantization) -> int:
    """Replace every nn.Linear of `model` (the LM head included) by its quantized form, one layer at a time so
    that memory stays near one dense layer above the result. Returns how many were replaced."""
    if mode in (Quantization.NONE, Quantization.AUTO):
        return 0
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, quantize_linear(getattr(owner, child), mode))
    model.config.tie_word_embeddings = False  # the LM head now has its own (quantized) weight
    log.info("quantized %d linear layers to %s", len(names), mode.value)
    return len(names)
