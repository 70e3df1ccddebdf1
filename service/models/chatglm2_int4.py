"""chatglm2-6b-int4's packed linears, read straight into `Int4Linear` modules of a GLM model.

In each layer `self_attention.query_key_value`, `self_attention.dense`, `mlp.dense_h_to_4h` and
`mlp.dense_4h_to_h` store `weight` as int8 [out, in / 2] (two signed 4-bit values per byte, element 2j in
the HIGH nibble, element 2j + 1 in the low one) and `weight_scale` [out]: W[r, i] = scale[r] * s[r, i].
`query_key_value` also keeps its floating-point `bias`.

A signed nibble s is the unsigned nibble s + 8 (`Int4Linear` subtracts 8), a per-row scale is one group
spanning the whole row, and the zero is 0, so the stored values are used as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from service.models.quant.int4 import Int4Linear, Kernel

#: ChatGLM2 linear (inside `transformer.encoder.layers.N.`) -> the GLM modules it becomes, in row order.
QUANTIZED_LINEARS: dict[str, tuple[str, ...]] = {
    "self_attention.query_key_value": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.dense": ("self_attn.o_proj",),
    "mlp.dense_h_to_4h": ("mlp.gate_up_proj",),
    "mlp.dense_4h_to_h": ("mlp.down_proj",),
}
QUANTIZED_PARTS = ("weight", "weight_scale", "bias")
LAYER_PREFIX = "transformer.encoder.layers."
NIBBLE_OFFSET = 8  # signed s in [-8, 7] -> unsigned s + 8 in [0, 15]


class PendingLinear(nn.Module):
    """Stands in for a quantized linear until its packed weight is read; holds no storage."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("this int4 linear was never loaded from the checkpoint")


def split_name(name: str) -> tuple[str, str] | None:
    """("transformer.encoder.layers.N.<linear>", part) for a tensor of a quantized linear, else None."""
    if not name.startswith(LAYER_PREFIX):
        return None
    linear, _, part = name.rpartition(".")
    inner = linear[len(LAYER_PREFIX):].partition(".")[2]
    return (linear, part) if inner in QUANTIZED_LINEARS and part in QUANTIZED_PARTS else None


def glm_modules(linear: str) -> tuple[str, ...]:
    """GLM module names that ChatGLM2 linear `transformer.encoder.layers.N.<linear>` becomes."""
    layer, _, inner = linear[len(LAYER_PREFIX):].partition(".")
    return tuple(f"model.layers.{layer}.{module}" for module in QUANTIZED_LINEARS[inner])


def defer_linears(model: nn.Module) -> None:
    """Swap every quantized linear of a (meta-device) GLM model for a `PendingLinear` of the same shape."""
    for index in range(len(model.model.layers)):
        for modules in QUANTIZED_LINEARS.values():
            for module in modules:
                name = f"model.layers.{index}.{module}"
                linear = model.get_submodule(name)
                pending = PendingLinear(linear.in_features, linear.out_features, linear.bias is not None)
                model.set_submodule(name, pending)


def pending_names(model: nn.Module) -> set[str]:
    """Names of the linears still waiting for their weights."""
    return {name for name, module in model.named_modules() if isinstance(module, PendingLinear)}


def is_complete(parts: dict[str, Tensor], wants_bias: bool) -> bool:
    """True once a linear's weight, scale and (if it has one) bias have all been read."""
    return {"weight", "weight_scale"} <= parts.keys() and (not wants_bias or "bias" in parts)


def unpack_int4(packed: Tensor) -> Tensor:
    """int8 [out, in / 2], element 2j in the high nibble -> uint8 [out, in] unsigned nibbles (s + 8)."""
    raw = packed.view(torch.uint8)  # the same bytes, read unsigned
    high = (raw >> 4) ^ NIBBLE_OFFSET  # two's complement nibble s -> s + 8
    low = (raw & 0x0F) ^ NIBBLE_OFFSET
    return torch.stack([high, low], dim=-1).view(packed.shape[0], 2 * packed.shape[1])


def check_parts(linear: str, parts: dict[str, Tensor], rows: int, in_features: int) -> None:
    """ValueError naming the tensor whose shape is not what chatglm2-6b-int4 stores (`weight` unpacked)."""
    weight, scale = parts["weight"], parts["weight_scale"]
    if tuple(weight.shape) != (rows, in_features):
        raise ValueError(f"{linear}.weight: packed shape {(weight.shape[0], weight.shape[1] // 2)}, config "
                         f"implies {(rows, in_features // 2)}")
    if not scale.is_floating_point() or tuple(scale.shape) != (rows,):
        raise ValueError(f"{linear}.weight_scale: want floating point [{rows}], got {scale.dtype} "
                         f"{list(scale.shape)}")
    bias = parts.get("bias")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ValueError(f"{linear}.bias: shape {tuple(bias.shape)}, want ({rows},)")


def build_linears(
    model: nn.Module,
    linear: str,
    parts: dict[str, Tensor],
    split_rows: Callable[[Tensor], tuple[Tensor, ...]],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[str, ...]:
    """Install the Int4Linear modules (or dense fallbacks) of one ChatGLM2 linear; their GLM names.
    `parts["weight"]` holds the unpacked nibbles (`unpack_int4`), the others as stored.

    `split_rows` splits a tensor's rows among the GLM modules (q, k, v for `query_key_value`, as the float
    checkpoint's rows are split; the identity otherwise)."""
    targets = glm_modules(linear)
    pending = [model.get_submodule(target) for target in targets]
    if not all(isinstance(p, PendingLinear) for p in pending):
        raise ValueError(f"{linear}: stored twice in the checkpoint")
    sizes = [p.out_features for p in pending]
    in_features = pending[0].in_features
    check_parts(linear, parts, sum(sizes), in_features)
    nibbles = split_rows(parts["weight"])
    scales = split_rows(parts["weight_scale"])
    biases = split_rows(parts["bias"]) if "bias" in parts else (None,) * len(sizes)
    for target, q, scale, bias, slot in zip(targets, nibbles, scales, biases, pending, strict=True):
        if slot.has_bias != (bias is not None):
            raise ValueError(f"{linear}: bias {'missing' if slot.has_bias else 'unexpected'} for {target}")
        # torch's kernel, which multiplies in float as THUDM's own kernels do, so that logits stay within 1e-4 of
        # the original's (tests/models/test_chatglm2*.py); ours rounds the inputs to ~16 bits: 2-4e-4
        module = Int4Linear.from_quantized(
            q, scale[:, None], torch.zeros_like(scale[:, None]), in_features, bias, device, dtype, Kernel.TORCH
        )
        model.set_submodule(target, module)
    return targets
