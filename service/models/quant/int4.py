"""4-bit weights for linear layers: `Int4Linear` (packed weights, our own or torch's int4 CPU kernel) and
`quantize_int4`.

A weight is stored as unsigned nibbles `q` in 0..15 with a scale and a zero per group of `group_size` inputs:

    W[o, i] = (q[o, i] - 8) * scale[o, g] + zero[o, g],   g = i // group_size

which is the convention of torch's `_weight_int4pack_mm_for_cpu`. Other formats map onto it losslessly:

* ChatGLM2-int4: signed nibble s in [-8, 7] with one scale per row -> q = s + 8, zero 0, the row's scale
  for every group (`group_size = in_features`);
* GGUF Q4_1 (w = d * q + m): scale d, zero m + 8 d; Q4_0 (w = d * (q - 8)): scale d, zero 0.

Our own kernel (service/models/quant/kernels, `Kernel.OWN`) takes any layer with `out_features % 16 == 0` and groups
in multiples of 32, where it was built and the CPU has AVX2; it stores W = d * q + m (d = scale,
m = zero - 8 * scale) in float16 per 32 inputs (a coarser group repeats its pair). Elsewhere torch's kernel runs.

Torch's kernel constraints (torch 2.13, CPU, checked by the tests): the packer wants `out_features % 16 == 0`; the
matmul wants a kernel group size of 32, 64, 128 or 256 dividing `in_features`, a contiguous 2-D input and
scales in the input's dtype (float32, bfloat16 or float16). A coarser quantization group (a whole row, say)
is split into kernel groups of the largest of those sizes that divides it, each repeating its scale.
Where these do not hold, or the device is not a CPU, `Int4Linear.from_quantized` returns a plain
`nn.Linear` holding the dequantized weight in the compute dtype instead.
"""

from __future__ import annotations

import enum
import sys

import torch
from torch import Tensor, nn

from service.models.quant import kernels

#: Group sizes `_weight_int4pack_mm_for_cpu` accepts, largest first (the largest is fastest and smallest).
KERNEL_GROUP_SIZES = (256, 128, 64, 32)
#: `_convert_weight_to_int4pack_for_cpu` needs the output features in multiples of this.
KERNEL_OUT_MULTIPLE = 16
TORCH_ROW_BLOCK = 64  # the packer lays out rows in blocks of this many
KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
#: Kernel inner-K tiling argument of the CPU packer (the CPU kernel ignores it; 1 is what torch's tests pass).
INNER_K_TILES = 1
ZERO_POINT = 8
MAX_NIBBLE = 15
#: The version of what a packed layer holds: `Int4Linear`'s and `Int8Linear`'s buffers (torch's layout and ours,
#: `kernels.pack_q4` / `pack_q8`), how `quantize_int4` and `Int8Linear` quantize, `INT4_GROUP`, and how the
#: loaders build them (service/models/chatglm2.py, chatglm2_int4.py). It is part of the key of the packed-weight
#: cache (service/models/weight_cache.py): bump it with any change to those, or restarts read weights of the old
#: layout.
PACKED_LAYOUT_VERSION = 1


def kernel_group_size(in_features: int, group_size: int) -> int | None:
    """The largest kernel group size that divides `group_size` (and so `in_features`), or None."""
    if in_features % group_size:
        return None
    return next((g for g in KERNEL_GROUP_SIZES if group_size % g == 0), None)


def kernel_fits(out_features: int, in_features: int, group_size: int, device: torch.device,
                dtype: torch.dtype) -> bool:
    """True where torch's int4 CPU kernel can run this layer."""
    return (
        device.type == "cpu"
        and dtype in KERNEL_DTYPES
        and out_features % KERNEL_OUT_MULTIPLE == 0
        and kernel_group_size(in_features, group_size) is not None
    )


def check_quantized(q: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Tensor | None) -> None:
    """ValueError when the quantized tensors do not describe one [out, in] weight with `group_size` groups."""
    if q.dim() != 2:
        raise ValueError(f"q must be [out, in], got shape {tuple(q.shape)}")
    out_features, in_features = q.shape
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    groups = (out_features, in_features // group_size)
    for name, tensor in (("scale", scale), ("zero", zero)):
        if tuple(tensor.shape) != groups:
            raise ValueError(f"{name} must be {list(groups)}, got {list(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {tensor.dtype}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [{out_features}], got {list(bias.shape)}")


def dequantize(q: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """The float32 weight [out, in] that `q`, `scale` and `zero` describe."""
    out_features, in_features = q.shape
    groups = q.view(out_features, in_features // group_size, group_size).float() - ZERO_POINT
    weight = groups * scale.float()[..., None] + zero.float()[..., None]
    return weight.view(out_features, in_features)


def regroup(groups: Tensor, group_size: int, kernel_group: int) -> Tensor:
    """Per-group values [out, in // group_size] repeated to per-kernel-group [out, in // kernel_group]."""
    return groups.repeat_interleave(group_size // kernel_group, dim=1)


class DenseCopy:
    """For packed layers that also keep their weight dense, for many rows at once (prefill chunks, big decode
    batches), where a dense matmul beats the packed kernels: those work through the rows one after another.

    `block_dense` lays the copy out in oneDNN's blocked format, as inductor's weight freezing does: the same
    results bit for bit, faster at every size measured (30 layers of 3072x576 in bf16 at 16 rows: 4.0 ms
    against 6.7 ms plain). The subclass provides `in_features`, `out_features` and `packed_matmul`."""

    #: From this many input rows on, a layer with a dense copy uses it (measured, 1536x576, one thread: 0.10 ms
    #: against 0.18 ms float32 at 1 row, 47 ms against 6 ms at 600 rows, a prefill's size). A default:
    #: `service.models.quant.kernel_choice` measures each layer shape's own switch.
    DENSE_FROM_ROWS = 24
    BLOCKING_ROWS_HINT = 16  # oneDNN picks its blocking for this many rows; any count runs on it
    NEVER = sys.maxsize
    dense_from_rows = NEVER  # without a dense copy the packed kernel takes every size
    dense_blocked = None

    def keep_dense(self, weight: Tensor) -> None:
        """Keep `weight` [out, in] (in the dtype dense matmuls are fast in) for many rows at once."""
        self.register_buffer("dense", weight, persistent=False)
        self.dense_from_rows = self.DENSE_FROM_ROWS
        self.dense_blocked = None

    @property
    def has_dense(self) -> bool:
        return getattr(self, "dense", None) is not None or self.dense_blocked is not None

    @property
    def dense_dtype(self) -> torch.dtype:
        return (self.dense_blocked if self.dense_blocked is not None else self.dense).dtype

    def block_dense(self) -> None:
        """Put the dense copy in oneDNN's blocked layout (CPU with oneDNN only, and for bfloat16 a CPU whose oneDNN
        has a bf16 path: AVX-512 BW/VL/DQ or AVX-NE-CONVERT) and drop the plain one; elsewhere the plain copy stays."""
        if self.dense_blocked is not None or self.dense.device.type != "cpu" \
                or not torch.backends.mkldnn.is_available():
            return
        if self.dense.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return
        self.dense_blocked = torch.ops.mkldnn._reorder_linear_weight(self.dense, self.BLOCKING_ROWS_HINT)
        del self.dense

    def drop_dense(self) -> None:
        """Forget the dense copy (memory for a layer that will not run): the packed kernel then takes every size."""
        if getattr(self, "dense", None) is not None:
            del self.dense
        self.dense_blocked = None
        self.dense_from_rows = self.NEVER

    def dense_matmul(self, flat: Tensor) -> Tensor:
        """flat [rows, in] -> [rows, out] through the dense copy, in its dtype (no bias)."""
        if self.dense_blocked is not None:
            return torch.ops.mkldnn._linear_pointwise(flat.to(self.dense_blocked.dtype), self.dense_blocked, None,
                                                      "none", [], "")
        return torch.nn.functional.linear(flat.to(self.dense.dtype), self.dense)

    def matmul(self, flat: Tensor) -> Tensor:
        """flat [rows, in] -> [rows, out] (no bias): the dense copy from `dense_from_rows` rows on, else packed."""
        if flat.shape[0] >= self.dense_from_rows:  # NEVER without a copy
            return self.dense_matmul(flat)
        return self.packed_matmul(flat)


class Kernel(str, enum.Enum):
    """The kernel a packed layer's weights are laid out for."""

    TORCH = "torch"  # aten's int4/int8 CPU kernels: inputs rounded to the scales' dtype (bfloat16 on CPU)
    OWN = "own"  # service/models/quant/kernels: inputs quantized to ~16 bits per group of 32, integer dot products


class Int4Linear(DenseCopy, nn.Module):
    """y = x @ W.T + bias, W stored packed 4-bit: W[o, i] = (q[o, i] - 8) * scale[o, g] + zero[o, g],
    g = i // group_size. Runs our own kernel (`Kernel.OWN`, float32 out) where it fits, else torch's int4 CPU
    kernel in the compute dtype; the result comes back in the input's dtype."""

    def __init__(self, packed: Tensor, scales: Tensor, in_features: int, out_features: int, group_size: int,
                 bias: Tensor | None, kernel: Kernel = Kernel.TORCH) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size  # the kernel's group size (a divisor of the quantization group)
        self.kernel = kernel
        # TORCH: packed [out, in // 2] uint8 and scales [in // group, out, 2] (scale, zero) in the compute dtype;
        # OWN: kernels.pack_q4's packed [out / 16, in / 8, 64] and scales [out / 16, in / 32, 2, 16] float16
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_quantized(
        cls,
        q: Tensor,
        scale: Tensor,
        zero: Tensor,
        group_size: int,
        bias: Tensor | None = None,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype = torch.float32,
        kernel: Kernel | None = None,
    ) -> Int4Linear | nn.Linear:
        """A layer for weight `q` ([out, in] nibbles 0..15) with `scale` / `zero` ([out, in // group_size]).

        `kernel` None: our own where it fits (`kernels.fits`, groups in multiples of 32), else torch's (see
        `kernel_fits`); where neither runs, an `nn.Linear` with the weight dequantized to `compute_dtype` on
        `device`. ValueError when the shapes do not agree."""
        check_quantized(q, scale, zero, group_size, bias)
        device = torch.device(device)
        out_features, in_features = q.shape
        bias = None if bias is None else bias.to(device=device, dtype=compute_dtype)
        if kernel is None:
            own = kernels.fits(out_features, in_features, device) and group_size % kernels.GROUP == 0
            kernel = Kernel.OWN if own else Kernel.TORCH
        if kernel is Kernel.OWN:  # a scale pair per 32 inputs
            d = regroup(scale, group_size, kernels.GROUP)
            m = regroup(zero - ZERO_POINT * scale, group_size, kernels.GROUP)  # W = d * q + m
            packed, scales = kernels.pack_q4(q, d, m)
            return cls(packed.to(device), scales.to(device), in_features, out_features, kernels.GROUP, bias,
                       Kernel.OWN)
        if not kernel_fits(out_features, in_features, group_size, device, compute_dtype):
            return dense_linear(dequantize(q, scale, zero, group_size), bias, device, compute_dtype)
        kernel_group = kernel_group_size(in_features, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(device=device, dtype=torch.int32), INNER_K_TILES
        )
        pairs = torch.stack([regroup(scale, group_size, kernel_group), regroup(zero, group_size, kernel_group)],
                            dim=-1)  # [out, in // kernel_group, 2]
        scales = pairs.transpose(0, 1).to(device=device, dtype=compute_dtype).contiguous()
        return cls(packed, scales, in_features, out_features, kernel_group, bias)

    @classmethod
    def concat(cls, layers: list[Int4Linear]) -> Int4Linear | None:
        """One layer computing the concatenation of `layers`' outputs (same input), or None where their packed
        weights don't concatenate: torch's packing lays out rows in blocks of 64 (a shorter last block differs),
        so every piece but the last must be whole blocks; ours, in blocks of 16, always concatenates."""
        first = layers[0]
        if not all(isinstance(x, Int4Linear) and x.kernel is first.kernel and x.group_size == first.group_size
                   and x.in_features == first.in_features for x in layers):
            return None
        biases = [x.bias for x in layers]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            return None
        if first.kernel is Kernel.TORCH:
            if any(x.out_features % TORCH_ROW_BLOCK for x in layers[:-1]):
                return None
            scales = torch.cat([x.scales for x in layers], dim=1)
        else:
            scales = torch.cat([x.scales for x in layers])
        bias = None if biases[0] is None else torch.cat(biases)
        fused = cls(torch.cat([x.packed for x in layers]), scales, first.in_features,
                    sum(x.out_features for x in layers), first.group_size, bias, first.kernel)
        if all(getattr(x, "dense", None) is not None for x in layers):
            fused.keep_dense(torch.cat([x.dense for x in layers]))
        return fused

    def packed_matmul(self, flat: Tensor) -> Tensor:
        """flat [rows, in] -> [rows, out] through the packed weights: float32 from ours, the compute dtype from
        torch's (no bias)."""
        if self.kernel is Kernel.OWN:
            return kernels.q4_matmul(flat, self.packed, self.scales)
        flat = flat.to(self.scales.dtype).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out], in x's dtype."""
        y = self.matmul(x.reshape(-1, self.in_features))  # [tokens, out]
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, kernel={self.kernel.value}")


def dense_linear(weight: Tensor, bias: Tensor | None, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    """An `nn.Linear` holding `weight` [out, in] (and `bias`) in `dtype` on `device`, without gradients."""
    out_features, in_features = weight.shape
    with torch.device("meta"):
        layer = nn.Linear(in_features, out_features, bias=bias is not None)
    layer.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
    return layer


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min/max 4-bit quantization of `weight` [out, in] per group of `group_size` inputs.

    Returns (q [out, in] uint8 in 0..15, scale, zero [out, in // group_size] float32) for
    `Int4Linear.from_quantized`. ValueError when `group_size` does not divide `in`."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    groups = weight.detach().float().view(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, groups]
    scale = ((high - low) / MAX_NIBBLE).clamp_min(torch.finfo(torch.float32).tiny)
    q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, MAX_NIBBLE).to(torch.uint8)
    zero = low + ZERO_POINT * scale
    return q.view(out_features, in_features), scale, zero
