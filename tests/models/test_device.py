"""The CUDA device decisions, checked on the CPU: which device `--device` names, that the loading and engine
threads make it their current device (so graph capture, synchronize and empty_cache act on cuda:N, not 0), and
which errors mean the device is lost (the engine stops) rather than one bad step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from service.engine import engine as engine_module
from service.engine.engine import device_lost
from service.models import loader
from service.models.gguf import llama_config, load_llama_gguf, read_gguf
from service.models.loader import default_model_file, resolve_device, use_device


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as a machine with two GPUs shows it; set_device calls are recorded."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_a_cuda_device_carries_its_index(two_gpus):
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="--device cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_no_cuda_is_a_clear_error_and_auto_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")


def test_the_chosen_gpu_becomes_the_threads_current_device(two_gpus):
    use_device(torch.device("cuda", 1))
    use_device(torch.device("cpu"))
    assert two_gpus == [torch.device("cuda", 1)]


def test_loading_and_the_engine_worker_both_set_the_device(monkeypatch):
    """Both threads that touch the device call use_device: the model's loader and the engine's build."""
    called = []
    monkeypatch.setattr(loader, "use_device", called.append)
    monkeypatch.setattr(engine_module, "use_device", called.append)
    with pytest.raises(Exception):  # noqa: B017 (only the call before the failure matters here)
        loader.load_model("/nonexistent/model", torch.device("cpu"), torch.float32)
    assert called == [torch.device("cpu")]
    def stop() -> None:
        raise RuntimeError("stop here")

    engine = engine_module.Engine.__new__(engine_module.Engine)  # only _build runs, up to sizing the pool
    engine.loaded = SimpleNamespace(model=SimpleNamespace(device=torch.device("cpu")))
    engine._size_pool = stop
    with pytest.raises(RuntimeError, match="stop here"):
        engine._build()
    assert called == [torch.device("cpu")] * 2


@pytest.mark.parametrize("error, device, lost", [
    (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), "cuda", True),
    (torch.AcceleratorError("CUDA error: unspecified launch failure"), "cpu", True),
    (RuntimeError("CUDA error: uncorrectable ECC error encountered"), "cuda", True),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"), "cuda", True),
    (RuntimeError("CUDA error: device-side assert triggered"), "cpu", False),  # words alone, off CUDA: a bug
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "cuda", False),  # recoverable
    (RuntimeError("shape mismatch"), "cuda", False),
    (ValueError("CUDA error: not a runtime error"), "cuda", False),
])
def test_which_errors_mean_the_device_is_lost(error, device, lost):
    assert device_lost(error, torch.device(device)) is lost


def tiny(*shapes: tuple[int, int]) -> torch.nn.Module:
    model = torch.nn.Sequential(*(torch.nn.Linear(i, o) for i, o in shapes))
    model.config = SimpleNamespace(tie_word_embeddings=True)
    return model


def test_int4_that_no_kernel_takes_is_refused_not_silently_dense():
    """What `--quantize int4` on CUDA meets (no int4 kernel there): every layer would stay dense, so loading is
    refused with a clear error instead of logging "quantized" over dense layers. Shown on the CPU with layers no
    int4 kernel takes (7 outputs: not a multiple of 16)."""
    from service.models.quant.quantize import Quantization, quantize_model

    with pytest.raises(ValueError, match="--quantize int4: no int4 kernel takes this model's linear layers on cpu"):
        quantize_model(tiny((30, 7), (7, 7)), Quantization.INT4)


def test_the_log_counts_the_layers_really_quantized(caplog):
    import logging

    from service.models.quant.quantize import Quantization, quantize_model

    model = tiny((64, 64), (64, 7))
    with caplog.at_level(logging.INFO, logger="service.models.quant.quantize"):
        assert quantize_model(model, Quantization.INT4) == 1
    assert "quantized 1 of 2 linear layers to int4 (1 stay dense: no kernel for their shape)" in caplog.text
    assert type(model[1]) is torch.nn.Linear and type(model[0]) is not torch.nn.Linear


def test_int8_off_the_cpu_is_refused_and_a_gguf_head_stays_dense():
    """Off the CPU (here the meta device stands for a GPU), torch's int8 matmul has no tensor cores: `--quantize
    int8` is refused rather than run on it, and the default GGUF's tied LM head reads the embedding densely
    instead of becoming Int8Linear."""
    from service.models.quant.quantize import Int8Linear, Quantization, quantize_linear, quantize_model

    with torch.device("meta"):
        model = tiny((64, 64), (64, 64))
    assert type(quantize_linear(model[0], Quantization.INT8)) is torch.nn.Linear
    with pytest.raises(ValueError, match="--quantize int8: no int8 kernel takes this model's linear layers on meta"):
        quantize_model(model, Quantization.INT8)
    assert type(quantize_linear(tiny((64, 64))[0], Quantization.INT8)) is Int8Linear  # on the CPU: our kernel
    gguf = read_gguf(default_model_file())
    off_cpu = load_llama_gguf(gguf, llama_config(gguf), torch.device("meta"), torch.bfloat16, True)
    assert type(off_cpu.lm_head) is torch.nn.Linear
    assert off_cpu.lm_head.weight is off_cpu.model.embed_tokens.weight  # tied, as the file stores it


def test_a_gpu_never_falls_back_to_quantized_weights_it_has_no_kernel_for(monkeypatch):
    from service.models.quant import precision

    monkeypatch.setattr(precision, "free_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(precision, "fast_dtype", lambda device: torch.bfloat16)
    with pytest.raises(MemoryError, match="dense weights do not fit in 6.8 GiB free on cuda, and int8/int4 have"):
        precision.choose("auto", "auto", torch.device("cuda", 0), 6_240_000_000, gguf=False)
    plan = precision.choose("auto", "auto", torch.device("cuda", 0), 1_000_000_000, gguf=False)
    assert (plan.dtype, plan.quantize) == (torch.bfloat16, precision.Quantization.NONE)


def test_quantized_modes_on_a_gpu_are_refused_at_start_up_and_a_gguf_says_it_runs_dense(monkeypatch):
    from service.models.quant import precision

    monkeypatch.setattr(precision, "fast_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(precision, "free_bytes", lambda device: 80 * 2**30)
    gpu = torch.device("cuda", 0)
    for mode in ("int4", "int8"):
        with pytest.raises(ValueError, match=f"--quantize {mode}: no {mode} kernel on cuda here yet"):
            precision.choose("auto", mode, gpu, None, gguf=True)
    plan = precision.choose("auto", "auto", gpu, None, gguf=True)
    assert plan.quantize == precision.Quantization.NONE and "dequantized (no int4 kernel on cuda yet)" in plan.reason
    assert precision.choose("auto", "auto", torch.device("cpu"), None, gguf=True).quantize.value == "int4"


@pytest.mark.parametrize("error", [ValueError("--quantize int4: no int4 kernel on cuda here yet"),
                                   MemoryError("60.0 B weights as int4 need 33.5 GiB")])
def test_a_start_up_refusal_is_one_clear_line_and_exit_2(monkeypatch, caplog, error):
    """What the operator sees when a choice is refused at start-up: `cannot start: ...`, exit status 2, no
    traceback (a MemoryError from the fit check included)."""
    import logging

    from service import main as entry
    from service import runtime

    async def refuse(config):
        raise error

    monkeypatch.setattr(runtime, "serve", refuse)
    with caplog.at_level(logging.ERROR, logger="service"):
        assert entry.main(["--port", "0"]) == 2
    assert f"cannot start: {error}" in caplog.text
