"""Our own CPU kernels, built once with the machine's C++ compiler and loaded from a cache: matmuls for 4-bit and
8-bit weights (qmatmul.cpp), and the small float32 ops of a decode step (decode_ops.cpp: rms_norm,
silu_mul, rope_store_attend, used by service/models/decoder.py).

Torch's int4 CPU kernel widens every weight to float; ours multiplies the weights as integers against the input
quantized per group of 32 (llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products, with AVX-512 VNNI or AVX2), but
to two int8 parts, x ~ d (q + r / 256), and with 4-bit weights taken centred: SmolLM2's perplexity on its own
Q4_1 weights then equals the float32 model's (23.878 against 23.879), where llama.cpp's one int8 part gave 24.147
and tipped "What is the capital of France?" off Paris when prompts ran on these kernels (qmatmul.cpp).

`load()` returns the module, or None where it cannot run (no AVX2, no compiler, `--cpu-kernels torch`, or a
failed build; the log says which); callers then use torch's kernels. The build takes ~25 s the first time
(`make setup` does it) and is kept in `--kernel-dir` (by default <--cache-dir>/kernels/torch-<version>); the
server's runtime calls `configure` with those settings before the model loads. A read-only directory with a build
in it (the container image's /opt/kernels) is loaded as it is.

Layouts (`pack_q4`, `pack_q8`), for N outputs and K inputs (N % 16 == 0, K % 32 == 0): blocks of 16 output rows,
row r of a block in 32-bit lane r of a 512-bit vector, so that a block's outputs accumulate in one register.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from service.config import DEFAULT_CACHE_DIR, CpuKernels, ServerConfig, cache_root

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("qmatmul.cpp", "decode_ops.cpp")]
NAME = "qmatmul"
ROWS = 16  # output rows per block
GROUP = 32  # inputs per scale group, of the weights and of the inputs
ISA_NAMES = {1: "AVX2", 2: "AVX-512 VNNI"}


@dataclass(frozen=True)
class Settings:
    """What the config says about our kernels (--cpu-kernels, --kernel-dir, --cache-dir)."""

    enabled: bool = True  # False: torch's kernels only
    directory: Path | None = None  # where they are built; None: under the default cache root


_settings = Settings()


def configure(config: ServerConfig) -> None:
    """Take the kernel settings from the server's config; call before anything loads the kernels."""
    global _settings
    directory = Path(config.kernel_dir).expanduser() if config.kernel_dir else default_dir(cache_root(config))
    settings = Settings(enabled=config.cpu_kernels is CpuKernels.AUTO, directory=directory)
    if settings != _settings:
        _settings = settings
        load.cache_clear()


def default_dir(cache: Path = DEFAULT_CACHE_DIR) -> Path:
    return cache / "kernels" / f"torch-{torch.__version__.split('+')[0]}"


def cache_dir() -> Path:
    """Where the kernels are built and loaded from."""
    return _settings.directory or default_dir()


@functools.cache
def load():
    """The compiled kernels, or None where they can't run here (the reason logged once)."""
    if not _settings.enabled:
        log.info("own CPU kernels off (--cpu-kernels torch): torch's int4/int8 kernels")
        return None
    try:
        module = build(cache_dir())
    except Exception as err:  # no compiler, no headers, a failed build: torch's kernels still work
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        log.warning("own CPU kernels unavailable (%s: %s); using torch's int4/int8 kernels", type(err).__name__,
                    reason)
        return None
    if module.isa() == 0:
        log.info("own CPU kernels need AVX2; using torch's int4/int8 kernels")
        return None
    return module


def build(directory: Path):
    """Compile qmatmul.cpp into `directory` (or reuse the build there); a read-only directory's build as it is."""
    started = time.perf_counter()
    built = directory / f"{NAME}.so"
    if built.exists() and not os.access(directory, os.W_OK):
        spec = importlib.util.spec_from_file_location(NAME, built)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        from torch.utils.cpp_extension import load as load_extension

        try:  # the ninja binary from PyPI, where the server runs without the venv's bin on PATH
            import ninja

            os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
        except ImportError:
            pass
        directory.mkdir(parents=True, exist_ok=True)
        # -fopenmp: at::parallel_for splits the outputs among torch's threads (its OpenMP runtime: torch's
        # libgomp.so.1 is already loaded, so the build's reference to libgomp.so.1 resolves to it)
        module = load_extension(name=NAME, sources=[str(p) for p in SOURCES], extra_cflags=["-O3", "-fopenmp"],
                                extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
    log.info("own CPU kernels (%s) ready in %.1f s", ISA_NAMES.get(module.isa(), "none"),
             time.perf_counter() - started)
    return module


def available() -> bool:
    return load() is not None


def fits(out_features: int, in_features: int, device: torch.device) -> bool:
    """Whether the kernels take a layer of this shape on this device."""
    return device.type == "cpu" and out_features % ROWS == 0 and in_features % GROUP == 0 and available()


def pack_q4(q: Tensor, d: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """q [N, K] (0..15), d, m [N, K/32] with W = d * q + m -> (bytes [N/16, K/8, 64], scales [N/16, K/32, 2, 16]
    float16). Byte 4r+j of chunk c holds row r's inputs 8c+j (low nibble) and 8c+4+j (high)."""
    n, k = q.shape
    v = q.to(torch.uint8).view(n // ROWS, ROWS, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # [B, C, r, j, half]
    packed = (v[..., 0] | (v[..., 1] << 4)).contiguous().view(n // ROWS, k // 8, 64)
    scales = torch.stack([blocked(d), blocked(m)], dim=2)  # [B, G, 2, 16]
    return packed, scales.to(torch.float16).contiguous()


def pack_q8(q: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """q [N, K] int8 (-127..127), d [N, K/32] with W = d * q -> (bytes [N/16, K/4, 64], scales [N/16, K/32, 16]
    float16). Byte 4r+j of chunk c is row r's input 4c+j."""
    n, k = q.shape
    packed = q.to(torch.int8).view(n // ROWS, ROWS, k // 4, 4).permute(0, 2, 1, 3).contiguous()
    return packed.view(n // ROWS, k // 4, 64), blocked(d).to(torch.float16).contiguous()


def blocked(groups: Tensor) -> Tensor:
    """Per-group values [N, G] -> [N/16, G, 16]: a block's 16 rows side by side."""
    n, g = groups.shape
    return groups.reshape(n // ROWS, ROWS, g).transpose(1, 2)


def q4_matmul(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] -> [M, N] float32."""
    return load().q4_matmul(x.float().contiguous(), packed, scales)


def q8_matmul(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] -> [M, N] float32."""
    return load().q8_matmul(x.float().contiguous(), packed, scales)

