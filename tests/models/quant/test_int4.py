"""Int4Linear against the dequantized matmul it stands for, on torch's kernel and on ours, and quantize_int4's
round trip. (Our kernel's exact arithmetic: tests/models/quant/test_kernels.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.models.quant import kernels
from service.models.quant.int4 import Int4Linear, Kernel, dequantize, kernel_fits, quantize_int4

CPU = torch.device("cpu")
OWN = pytest.param(Kernel.OWN, marks=pytest.mark.skipif(not kernels.available(), reason="own kernels not built here"))
BOTH = [Kernel.TORCH, OWN]
#: max error / max |result| in float32: torch's kernel multiplies in float32; ours keeps scales in float16 (these
#: random ones are not float16 values) and rounds inputs to ~16 bits per 32
TOLERANCE = {Kernel.TORCH: 1e-5, Kernel.OWN: 2e-3}


def random_quantized(out_features: int, in_features: int, group_size: int, seed: int = 0):
    """Random nibbles, positive scales and zeros: (q, scale, zero)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=generator)
    groups = (out_features, in_features // group_size)
    scale = torch.rand(groups, generator=generator) * 0.1 + 0.01
    zero = torch.randn(groups, generator=generator) * 0.05
    return q, scale, zero


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)]
)
@pytest.mark.parametrize(("out_features", "in_features", "group_size"),
                         [(64, 128, 32), (48, 256, 128), (32, 512, 512), (16, 192, 64)])
def test_kernel_agrees_with_dequantized_matmul(
    dtype: torch.dtype, tolerance: float, out_features: int, in_features: int, group_size: int
) -> None:
    q, scale, zero = random_quantized(out_features, in_features, group_size)
    bias = torch.randn(out_features)
    layer = Int4Linear.from_quantized(q, scale, zero, group_size, bias, CPU, dtype, Kernel.TORCH)
    assert isinstance(layer, Int4Linear) and layer.kernel is Kernel.TORCH
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == out_features * in_features // 2
    x = torch.randn(5, in_features)
    want = x @ dequantize(q, scale, zero, group_size).T + bias
    got = layer(x.to(dtype))
    assert got.dtype == dtype and got.shape == (5, out_features)
    assert relative_error(got, want) < tolerance


def test_dequantize_follows_the_formula() -> None:
    q = torch.tensor([[0, 8, 15, 3]], dtype=torch.uint8)
    scale, zero = torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0, -1.0]])
    expected = torch.tensor([[(0 - 8) * 0.5 + 1, (8 - 8) * 0.5 + 1, (15 - 8) * 2.0 - 1, (3 - 8) * 2.0 - 1]])
    assert torch.equal(dequantize(q, scale, zero, 2), expected)


@pytest.mark.parametrize(("out_features", "in_features", "group_size"),
                         [(64, 128, 32), (48, 256, 128), (32, 512, 512), (16, 192, 64)])
def test_own_kernel_agrees_with_dequantized_matmul(out_features: int, in_features: int, group_size: int) -> None:
    """Ours by default where it fits: float32 in and out, within float16 scales and inputs rounded to ~16 bits."""
    if not kernels.available():
        pytest.skip("own kernels not built here")
    q, scale, zero = random_quantized(out_features, in_features, group_size)
    bias = torch.randn(out_features)
    layer = Int4Linear.from_quantized(q, scale, zero, group_size, bias, CPU, torch.bfloat16)
    assert isinstance(layer, Int4Linear) and layer.kernel is Kernel.OWN and layer.group_size == 32
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == out_features * in_features // 2
    x = torch.randn(5, in_features)
    got = layer(x)
    assert got.dtype == torch.float32
    assert relative_error(got, x @ dequantize(q, scale, zero, group_size).T + bias) < TOLERANCE[Kernel.OWN]


def test_row_scale_is_split_into_kernel_groups() -> None:
    """A per-row scale (group = the whole row) runs on torch's kernel with the largest group that divides it."""
    q, scale, zero = random_quantized(32, 384, 384)
    layer = Int4Linear.from_quantized(q, scale, zero, 384, None, CPU, torch.float32, Kernel.TORCH)
    assert isinstance(layer, Int4Linear) and layer.group_size == 128
    assert layer.scales.shape == (3, 32, 2)
    x = torch.randn(3, 384)
    assert relative_error(layer(x), x @ dequantize(q, scale, zero, 384).T) < 1e-5


@pytest.mark.parametrize("kernel", BOTH)
@pytest.mark.parametrize("leading", [(), (7,), (2, 3), (2, 1, 4)])
def test_any_leading_dims(leading: tuple[int, ...], kernel: Kernel) -> None:
    q, scale, zero = random_quantized(32, 64, 32)
    layer = Int4Linear.from_quantized(q, scale, zero, 32, None, CPU, torch.float32, kernel)
    x = torch.randn(*leading, 64)
    y = layer(x)
    assert y.shape == (*leading, 32)
    want = x.reshape(-1, 64) @ dequantize(q, scale, zero, 32).T
    assert relative_error(y.reshape(-1, 32), want) < TOLERANCE[kernel]


@pytest.mark.parametrize("kernel", BOTH)
def test_non_contiguous_and_empty_inputs(kernel: Kernel) -> None:
    q, scale, zero = random_quantized(32, 64, 32)
    layer = Int4Linear.from_quantized(q, scale, zero, 32, None, CPU, torch.float32, kernel)
    x = torch.randn(64, 6).T  # [6, 64], not contiguous
    assert relative_error(layer(x), x @ dequantize(q, scale, zero, 32).T) < TOLERANCE[kernel]
    assert layer(torch.randn(2, 0, 64)).shape == (2, 0, 32)


@pytest.mark.parametrize("kernel", BOTH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_of_another_dtype_is_cast_and_returned_in_its_dtype(kernel: Kernel, dtype: torch.dtype) -> None:
    q, scale, zero = random_quantized(32, 64, 32)
    layer = Int4Linear.from_quantized(q, scale, zero, 32, None, CPU, torch.bfloat16, kernel)
    x = torch.randn(4, 64, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert relative_error(y, x.float() @ dequantize(q, scale, zero, 32).T) < 2e-2


@pytest.mark.parametrize(
    ("out_features", "in_features", "group_size", "why"),
    [
        (24, 64, 32, "out not a multiple of 16"),
        (32, 48, 16, "group smaller than the kernel's"),
        (32, 96, 48, "group 48 not a multiple of 32"),
        (17, 33, 33, "odd everything"),
    ],
)
def test_shapes_the_kernel_refuses_fall_back_to_dense(
    out_features: int, in_features: int, group_size: int, why: str
) -> None:
    q, scale, zero = random_quantized(out_features, in_features, group_size)
    bias = torch.randn(out_features)
    assert not kernel_fits(out_features, in_features, group_size, CPU, torch.float32), why
    layer = Int4Linear.from_quantized(q, scale, zero, group_size, bias, CPU, torch.float32, Kernel.TORCH)
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
    assert not layer.weight.requires_grad
    x = torch.randn(2, 3, in_features)
    want = x @ dequantize(q, scale, zero, group_size).T + bias
    assert torch.allclose(layer(x), want, atol=1e-6)


def test_devices_without_the_kernel_fall_back_to_dense() -> None:
    assert not kernel_fits(64, 64, 32, torch.device("cuda"), torch.float16)
    assert not kernel_fits(64, 64, 32, torch.device("meta"), torch.float32)
    assert not kernel_fits(64, 64, 32, CPU, torch.float64)
    assert not kernels.fits(64, 64, torch.device("cuda")) and not kernels.fits(64, 64, torch.device("meta"))
    q, scale, zero = random_quantized(64, 64, 32)
    layer = Int4Linear.from_quantized(q, scale, zero, 32, None, CPU, torch.float64, Kernel.TORCH)
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float64
    assert torch.equal(layer.weight, dequantize(q, scale, zero, 32).double())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"group_size": 24}, "does not divide"),
        ({"scale": torch.ones(32, 3)}, "scale must be"),
        ({"zero": torch.zeros(32, 2, dtype=torch.int32)}, "zero must be floating"),
        ({"bias": torch.zeros(31)}, "bias must be"),
        ({"q": torch.zeros(32, dtype=torch.uint8)}, "q must be"),
    ],
)
def test_inconsistent_inputs_are_refused(edit: dict, message: str) -> None:
    q, scale, zero = random_quantized(32, 64, 32)
    args = {"q": q, "scale": scale, "zero": zero, "group_size": 32, "bias": None, **edit}
    with pytest.raises(ValueError, match=message):
        Int4Linear.from_quantized(**args)


def test_signed_nibbles_with_row_scales_map_losslessly() -> None:
    """ChatGLM2-int4's form: s in [-7, 7] times a per-row scale is q = s + 8 with zero 0 and group = row."""
    generator = torch.Generator().manual_seed(1)
    signed = torch.randint(-7, 8, (32, 128), generator=generator)
    row_scale = torch.rand(32, generator=generator).half().float()
    layer = Int4Linear.from_quantized((signed + 8).to(torch.uint8), row_scale[:, None],
                                      torch.zeros(32, 1), 128, None, CPU, torch.float32, Kernel.TORCH)
    x = torch.randn(4, 128)
    assert relative_error(layer(x), x @ (signed * row_scale[:, None]).T) < 1e-6


@pytest.mark.parametrize("group_size", [32, 128])
def test_quantize_int4_round_trip(group_size: int) -> None:
    weight = torch.randn(48, 256)
    q, scale, zero = quantize_int4(weight, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == (48, 256 // group_size)
    restored = dequantize(q, scale, zero, group_size)
    step = scale.repeat_interleave(group_size, dim=1)
    assert bool(((restored - weight).abs() <= step / 2 + 1e-6).all())  # within half a step everywhere
    groups = weight.view(48, -1, group_size)
    assert torch.allclose(restored.view(48, -1, group_size).amin(-1), groups.amin(-1), atol=1e-6)
    assert torch.allclose(restored.view(48, -1, group_size).amax(-1), groups.amax(-1), atol=1e-5)


def test_quantize_int4_constant_group_is_exact() -> None:
    weight = torch.full((16, 64), 0.3)
    weight[:, 32:] = -2.0
    q, scale, zero = quantize_int4(weight, 32)
    assert torch.allclose(dequantize(q, scale, zero, 32), weight, atol=1e-7)


def test_quantize_int4_refuses_a_group_that_does_not_divide() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        quantize_int4(torch.randn(16, 48), 32)


def test_quantized_nn_linear_stays_close() -> None:
    """--quantize int4's path: an nn.Linear's weight quantized and served by Int4Linear."""
    linear = nn.Linear(128, 64)
    q, scale, zero = quantize_int4(linear.weight, 32)
    layer = Int4Linear.from_quantized(q, scale, zero, 32, linear.bias.detach(), CPU, torch.bfloat16)
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert relative_error(layer(x), linear(x)) < 0.1


@pytest.mark.parametrize("kernel", BOTH)
def test_quantizing_a_block_of_rows_at_a_time_equals_the_whole_layer(monkeypatch, kernel):
    """quantize_linear works through big layers QUANTIZE_ROWS rows at a time (less memory at once); the result
    is the same layer as quantizing and packing it whole."""
    from service.models.quant import quantize

    if kernel is Kernel.TORCH:
        monkeypatch.setattr(kernels, "fits", lambda *args: False)
    torch.manual_seed(0)
    layer = nn.Linear(64, 320, bias=True)
    whole = quantize.quantize_linear(layer, quantize.Quantization.INT4)
    monkeypatch.setattr(quantize, "QUANTIZE_ROWS", 128)  # blocks of 128, 128 and 64 rows
    blocks = quantize.quantize_linear(layer, quantize.Quantization.INT4)
    assert blocks.kernel is whole.kernel is kernel
    assert torch.equal(blocks.packed, whole.packed)
    assert torch.equal(blocks.scales, whole.scales)
    x = torch.randn(3, 64)
    assert torch.equal(blocks(x), whole(x))


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_blocked_dense_copy_computes_the_same_bits(kind):
    """block_dense lays the dense copy out for oneDNN and drops the plain one; every size computes the same. The
    copy is in the dtype this CPU's dense copies get: bfloat16 where oneDNN has a bf16 path, and then the bits are
    equal; else float32, whose blocked kernel sums in another order (equal to float32 rounding)."""
    from service.models.quant.precision import fast_dtype
    from service.models.quant.quantize import Quantization, quantize_linear

    torch.manual_seed(0)
    dtype = fast_dtype(torch.device("cpu"))
    layer = nn.Linear(64, 128, bias=False)
    packed = quantize_linear(layer, Quantization.INT4 if kind == "int4" else Quantization.INT8)
    packed.keep_dense(layer.weight.detach().to(dtype))
    packed.dense_from_rows = 4
    inputs = [torch.randn(rows, 64) for rows in (1, 4, 16, 600)] + [torch.randn(2, 5, 64)]
    plain = [packed(x) for x in inputs]
    packed.block_dense()
    assert getattr(packed, "dense", None) is None and packed.has_dense
    assert packed.dense_dtype == dtype and packed.dense_blocked.is_mkldnn
    for x, before in zip(inputs, plain, strict=True):
        if dtype == torch.bfloat16:
            assert torch.equal(packed(x), before)
        else:
            torch.testing.assert_close(packed(x), before, rtol=1e-5, atol=1e-5)


def test_a_bfloat16_copy_stays_plain_where_onednn_has_no_bf16_path(monkeypatch):
    """On an AVX2-only CPU oneDNN cannot reorder bf16 weights (it raises); block_dense then keeps the plain copy."""
    from service.models.quant.quantize import Quantization, quantize_linear

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    layer = nn.Linear(64, 128, bias=False)
    packed = quantize_linear(layer, Quantization.INT8)
    packed.keep_dense(layer.weight.detach().bfloat16())
    packed.block_dense()
    assert packed.dense_blocked is None and packed.dense.dtype == torch.bfloat16
