"""Our own CPU kernels (service/models/quant/kernels): the layouts, and the arithmetic against a float emulation of
what they compute (inputs quantized per group of 32 to two int8 parts, integer dot products, float scales)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from service.models.quant import kernels
from service.models.quant.int4 import Int4Linear, Kernel, dequantize
from service.models.quant.quantize import Int8Linear

ROOT = Path(__file__).resolve().parents[3]
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="own kernels not built here")


def cpu_has_avx2() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and " avx2" in cpuinfo.read_text()


def test_the_kernels_build_wherever_they_can_run():
    """With AVX2 and a C++ compiler they must be there: a failed build would quietly fall back to torch's."""
    if not (cpu_has_avx2() and shutil.which("c++") and sys.platform == "linux"):
        pytest.skip("no AVX2 or no C++ compiler here")
    assert kernels.available()
    assert kernels.load().isa() in kernels.ISA_NAMES


def test_off_switch_falls_back_to_torch():
    """CHAT_CPU_KERNELS=torch (--cpu-kernels torch), read by the config like every setting."""
    code = ("from service.config import load_config; from service.models.quant import kernels, quantize; "
            "import torch; kernels.configure(load_config([])); "
            "print(kernels.available(), quantize.Int8Linear(torch.randn(32, 64), None, torch.bfloat16).kernel.value)")
    env = {**os.environ, "CHAT_CPU_KERNELS": "torch"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "torch"]


def quantize_inputs(x: torch.Tensor):
    """What the kernels do to an input [M, K]: per group of 32, x ~ d (q + r / 256) with d = max|x| / 127,
    q = round(x * 127 / max|x|) and r = round(256 (x * 127 / max|x| - q)) in -127..127; s = sum(x) in float.
    Returns q + r / 256 (float64, exact) [M, G, 32], d and s [M, G]."""
    groups = x.view(x.shape[0], -1, kernels.GROUP)
    top = groups.abs().amax(-1)
    # divisions as IEEE float32 does them (torch's scalar / tensor can be an ulp off): in float64, then rounded
    inverse = torch.where(top > 0, (127.0 / top.double()).float(), torch.zeros_like(top))
    scaled = groups * inverse[..., None]
    rounded = scaled.round()
    rest = ((scaled - rounded) * 256).round().clamp(-127, 127)
    d = (top.double() / 127.0).float()
    return rounded.double() + rest.double() / 256, d, groups.sum(-1)


def q4_emulated(x, q, d, m):
    """y [M, N] for W = d * q + m (d, m [N, G] as float16 holds them), centred: W = d (q - 8) + (m + 8 d), the
    quantized inputs against q - 8 and the exact input sums against m + 8 d."""
    xq, xd, xs = quantize_inputs(x)
    n = q.shape[0]
    sums = torch.einsum("mgk,ngk->mng", xq, q.view(n, -1, kernels.GROUP).double() - 8).float()
    d, m = d.half().float(), m.half().float()
    return (sums * d[None] * xd[:, None] + (m + 8 * d)[None] * xs[:, None]).sum(-1)


def q8_emulated(x, q, d):
    xq, xd, _ = quantize_inputs(x)
    n = q.shape[0]
    sums = torch.einsum("mgk,ngk->mng", xq, q.view(n, -1, kernels.GROUP).double()).float()
    return (sums * d.half().float()[None] * xd[:, None]).sum(-1)


def close(got, want):
    return ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@needs_kernels
@pytest.mark.parametrize(("n", "k"), [(16, 32), (48, 96), (960, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
def test_q4_computes_the_emulation(n, k, rows):
    generator = torch.Generator().manual_seed(n + k + rows)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    d = torch.rand(n, k // 32, generator=generator) * 0.1
    m = -torch.rand(n, k // 32, generator=generator) * 0.5
    x = torch.randn(rows, k, generator=generator)
    got = kernels.q4_matmul(x, *kernels.pack_q4(q, d, m))
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert close(got, q4_emulated(x, q, d, m))


@needs_kernels
def test_q4_refuses_scales_of_another_group():
    packed, scales = kernels.pack_q4(torch.zeros(16, 128, dtype=torch.uint8), torch.ones(16, 1), torch.zeros(16, 1))
    with pytest.raises(RuntimeError, match="scales must be"):
        kernels.q4_matmul(torch.randn(1, 128), packed, scales)  # one pair per 128 inputs: not the layout it runs


@needs_kernels
@pytest.mark.parametrize(("n", "k"), [(16, 32), (48, 96), (576, 576)])
@pytest.mark.parametrize("rows", [1, 4, 7])
def test_q8_computes_the_emulation(n, k, rows):
    generator = torch.Generator().manual_seed(n + k + rows)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    d = torch.rand(n, k // 32, generator=generator) * 0.01
    x = torch.randn(rows, k, generator=generator)
    got = kernels.q8_matmul(x, *kernels.pack_q8(q, d))
    assert got.shape == (rows, n)
    assert close(got, q8_emulated(x, q, d))


@needs_kernels
def test_zero_inputs_rows_and_groups():
    q = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    d, m = torch.rand(32, 2), torch.rand(32, 2)
    packed = kernels.pack_q4(q, d, m)
    assert kernels.q4_matmul(torch.zeros(0, 64), *packed).shape == (0, 32)
    assert torch.equal(kernels.q4_matmul(torch.zeros(2, 64), *packed), torch.zeros(2, 32))
    x = torch.randn(1, 64)
    x[:, :32] = 0  # a group of zeros contributes nothing, and no NaN
    assert close(kernels.q4_matmul(x, *packed), q4_emulated(x, q, d, m))


@needs_kernels
def test_a_wrong_input_width_is_refused():
    packed = kernels.pack_q4(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 2), torch.zeros(16, 2))
    with pytest.raises(RuntimeError, match="input must be"):
        kernels.q4_matmul(torch.randn(1, 32), *packed)


def test_q4_layout():
    """Byte 4r + j of chunk c holds row r's inputs 8c + j (low nibble) and 8c + 4 + j (high nibble)."""
    q = torch.arange(32 * 64).view(32, 64) % 16
    packed, scales = kernels.pack_q4(q, torch.ones(32, 2), torch.zeros(32, 2))
    assert packed.shape == (2, 8, 64) and scales.shape == (2, 2, 2, 16) and scales.dtype == torch.float16
    for block, r, c, j in [(0, 0, 0, 0), (1, 5, 3, 2), (0, 15, 7, 3)]:
        byte = int(packed[block, c, 4 * r + j])
        row = 16 * block + r
        assert byte & 0x0F == q[row, 8 * c + j] and byte >> 4 == q[row, 8 * c + 4 + j]


def test_q8_layout():
    q = (torch.arange(32 * 64).view(32, 64) % 255 - 127).to(torch.int8)
    packed, scales = kernels.pack_q8(q, torch.ones(32, 2))
    assert packed.shape == (2, 16, 64) and scales.shape == (2, 2, 16)
    for block, r, c, j in [(0, 0, 0, 0), (1, 5, 3, 2), (0, 15, 15, 3)]:
        assert packed[block, c, 4 * r + j] == q[16 * block + r, 4 * c + j]


@needs_kernels
def test_an_int8_layer_reads_q8_0_weights_back_exactly():
    """GGUF's Q8_0 head (q * d per 32, d float16, each block reaching +-127) is stored as it was."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (64, 96), generator=generator)
    q[:, ::32] = 127  # llama.cpp scales each block by its max
    d = (torch.rand(64, 3, generator=generator) * 0.01).half().float()
    weight = (q.view(64, 3, 32) * d[..., None]).view(64, 96)
    layer = Int8Linear(weight, None, torch.bfloat16)
    assert layer.kernel is Kernel.OWN
    assert torch.equal(layer.packed, kernels.pack_q8(q, d)[0]) and torch.equal(layer.scales, kernels.pack_q8(q, d)[1])
    x = torch.randn(3, 96)
    assert close(layer(x), q8_emulated(x, q, d))


@needs_kernels
def test_an_int4_layer_on_our_kernel_is_what_the_emulation_computes():
    generator = torch.Generator().manual_seed(4)
    q = torch.randint(0, 16, (48, 64), dtype=torch.uint8, generator=generator)
    scale, zero = torch.rand(48, 2, generator=generator) * 0.1, torch.randn(48, 2, generator=generator) * 0.1
    layer = Int4Linear.from_quantized(q, scale, zero, 32, None, "cpu", torch.bfloat16)
    assert layer.kernel is Kernel.OWN
    x = torch.randn(2, 64)
    assert close(layer(x), q4_emulated(x, q, scale, zero - 8 * scale))
    assert ((layer(x) - x @ dequantize(q, scale, zero, 32).T).abs().max() / (x @ dequantize(q, scale, zero, 32).T)
            .abs().max()) < 2e-2


@needs_kernels
def test_fused_layers_on_our_kernel_equal_the_parts():
    """Int4Linear.concat and Int8Linear.concat: our 16-row blocks concatenate at any multiple of 16 rows."""
    torch.manual_seed(5)
    parts4 = [Int4Linear.from_quantized(torch.randint(0, 16, (n, 64), dtype=torch.uint8), torch.rand(n, 2),
                                        torch.rand(n, 2), 32, None, "cpu", torch.bfloat16) for n in (48, 16, 32)]
    parts8 = [Int8Linear(torch.randn(n, 64), None, torch.bfloat16) for n in (48, 16)]
    x = torch.randn(3, 64)
    for kind, parts in ((Int4Linear, parts4), (Int8Linear, parts8)):
        fused = kind.concat(parts)
        assert fused.kernel is Kernel.OWN
        assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    assert Int4Linear.concat([parts4[0], Int4Linear.from_quantized(
        torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 2), torch.zeros(16, 2), 32, None, "cpu",
        torch.bfloat16, Kernel.TORCH)]) is None  # different layouts do not mix


@needs_kernels
def test_a_read_only_directory_with_a_build_is_loaded_as_it_is(tmp_path):
    """The container image compiles into CHAT_KERNEL_DIR (--kernel-dir), read-only at run time: no compiler, no
    lock files."""
    shutil.copy(kernels.cache_dir() / f"{kernels.NAME}.so", tmp_path)
    code = ("import os, logging; logging.basicConfig(level=logging.INFO); os.access = lambda *a, **k: False; "
            "import torch; from service.config import load_config; from service.models.quant import kernels; "
            "kernels.configure(load_config([])); "
            "print(kernels.available(), kernels.q4_matmul(torch.zeros(1, 32), torch.zeros(1, 4, 64, "
            "dtype=torch.uint8), torch.ones(1, 1, 2, 16, dtype=torch.float16)).shape)")
    env = {**os.environ, "CHAT_KERNEL_DIR": str(tmp_path), "PATH": "/nonexistent"}  # no compiler to be found
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "torch.Size([1,", "16])"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{kernels.NAME}.so"]


@needs_kernels
@pytest.mark.parametrize("isa", [1, 2])
def test_the_avx2_path_computes_the_same(isa):
    """The AVX2 kernels run here too (`use_isa`), so a CPU without AVX-512 gets tested code."""
    module = kernels.load()
    detected = module.use_isa(2)
    if isa > detected:
        pytest.skip("no AVX-512 VNNI here")
    try:
        assert module.use_isa(isa) == isa
        generator = torch.Generator().manual_seed(isa)
        q4 = torch.randint(0, 16, (48, 96), dtype=torch.uint8, generator=generator)
        d, m = torch.rand(48, 3, generator=generator) * 0.1, -torch.rand(48, 3, generator=generator)
        q8 = torch.randint(-127, 128, (48, 96), dtype=torch.int8, generator=generator)
        x = torch.randn(5, 96, generator=generator)
        assert close(kernels.q4_matmul(x, *kernels.pack_q4(q4, d, m)), q4_emulated(x, q4, d, m))
        assert close(kernels.q8_matmul(x, *kernels.pack_q8(q8, d)), q8_emulated(x, q8, d))
    finally:
        module.use_isa(detected)


@needs_kernels
def test_rms_norm_and_silu_mul_equal_torch():
    import torch.nn.functional as F

    ops = kernels.load()
    x, weight = torch.randn(3, 1, 576), torch.randn(576)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), F.rms_norm(x, (576,), weight, 1e-5),
                               rtol=1e-5, atol=1e-5)
    gate_up = torch.randn(2, 1, 2 * 1536) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.rms_norm(x.double(), weight, 1e-5)


@needs_kernels
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "pairs"),
                         [(9, 3, 64, 0), (4, 4, 32, 0), (8, 2, 16, 0), (32, 2, 128, 32), (4, 2, 32, 4)])
def test_rope_store_attend_equals_the_torch_ops_over_block_tables(heads, kv_heads, head_dim, pairs):
    """Rotary, the K/V write and attention in one call against the torch ops the step attention uses without it
    (service/engine/step_attention.py): the same output, the same pool, each row at its own position in its own
    scattered blocks, GQA included; rotary in halves (Llama, pairs 0) and in interleaved pairs over part of the
    head (GLM)."""
    from service.engine import attention
    from service.engine.kv_cache import KVPool
    from service.engine.step_attention import slots_of, split_heads
    from service.models.decoder import rotate, rotate_pairs

    generator = torch.Generator().manual_seed(heads)
    blocks, size, rows = 12, 8, 3
    pool = KVPool(layers=1, kv_heads=kv_heads, head_dim=head_dim, num_blocks=blocks, block_size=size,
                  dtype=torch.float32, device=torch.device("cpu"))
    pool.data.copy_(torch.randn(pool.data.shape, generator=generator))
    tables = torch.tensor([[7, 2, 9], [4, 0, 0], [11, 1, 5]])  # padded with block 0
    positions = torch.tensor([17, 0, 23])
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator)
    if pairs:
        table = torch.randn(3 * size, pairs, generator=generator).repeat_interleave(2, dim=-1)
    else:
        table = torch.randn(3 * size, head_dim // 2, generator=generator).repeat(1, 2)
    cos, sin = table.cos()[positions], table.sin()[positions]
    block = SimpleNamespace(heads=heads, kv_heads=kv_heads, head_dim=head_dim, index=0, scale=0.3)
    want = KVPool(layers=1, kv_heads=kv_heads, head_dim=head_dim, num_blocks=blocks, block_size=size,
                  dtype=torch.float32, device=torch.device("cpu"))
    want.data.copy_(pool.data)
    q, k, v = split_heads(block, qkv, rotate_pairs if pairs else rotate, cos, sin)
    want.write(0, slots_of(tables, positions, size), k, v)
    keys, values = want.gather(0, tables)
    mask = attention.visible(positions[:, None], 3 * size)
    expected = attention.decode_attention(q[:, :, None], keys, values, mask, 0.3).reshape(rows, -1)
    got = kernels.load().rope_store_attend(qkv, cos, sin, pool.storage(0), tables, positions, heads, 0.3, pairs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool.data, want.data, rtol=1e-6, atol=1e-6)
