"""Load an original THUDM ChatGLM2-6B checkpoint onto transformers' native `GlmForCausalLM`.

Nothing from the checkpoint directory is executed: `config.json` is read as plain JSON, the `auto_map`
entries and any `*.py` files are ignored, `.bin` shards go through `torch.load(weights_only=True)`.

Weights are converted tensor by tensor, shard by shard, into a model whose storage was allocated once
in the target dtype (built on the meta device, then `to_empty`), so peak memory stays near one copy of
the weights in that dtype plus the shard currently mapped.

ChatGLM2 -> GLM mapping (per layer `transformer.encoder.layers.N.` -> `model.layers.N.`):

* `self_attention.query_key_value` (weight, bias) -> `self_attn.{q,k,v}_proj`, split by rows into
  `heads * kv_channels`, `groups * kv_channels`, `groups * kv_channels` (multi-query attention), or
  per head `[q_h; k_h; v_h]` when `multi_query_attention` is false;
* `self_attention.dense` -> `self_attn.o_proj`; `mlp.dense_h_to_4h` -> `mlp.gate_up_proj` (gate rows
  first, as GLM expects); `mlp.dense_4h_to_h` -> `mlp.down_proj`; the two RMSNorms keep their names;
* `transformer.embedding.word_embeddings` -> `model.embed_tokens`, `transformer.encoder.final_layernorm`
  -> `model.norm`, `transformer.output_layer` -> `lm_head` (not tied); `rotary_pos_emb.inv_freq` dropped.

Rotary: ChatGLM2 rotates the first half of each head (`kv_channels // 2` dims) in interleaved pairs
(x0, x1), (x2, x3), ... with theta 10000 over that half. GLM's `partial_rotary_factor=0.5` with its
interleaved `rotate_half` is exactly that, so q/k rows are copied as they are (no permutation, unlike
Llama conversions).

chatglm2-6b-32k (`rope_ratio` r): the original divides the positions by r and keeps the base at 10000
(position interpolation). That is transformers' `linear` rope type with factor r (inv_freq / r). It is not
a base of 10000 * r, which is what vLLM and llama.cpp use (right for chatglm3-6b-32k, wrong here).

chatglm2-6b-int4 (`quantization_bit: 4`): the four linears of each layer hold `weight` as int8
[out, in / 2], two signed nibbles per byte, element 2j in the high nibble, and `weight_scale` [out]. They
become `Int4Linear` modules directly (nibble s -> s + 8 with zero 0, the row's scale as one group per row),
so nothing is re-quantized and the dense weight is never built where the int4 kernel runs. Embedding, norms
and `output_layer` stay floating point.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import pickle
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import GenerationConfig, GlmConfig, GlmForCausalLM
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

from service.models import chatglm2_int4
from service.models.base import LoadedModel
from service.models.chatglm2_tokenizer import ChatGLM2Tokenizer
from service.models.quant.int4 import dense_linear, kernel_fits
from service.models.quant.quantize import INT4_GROUP, Quantization, quantize_linear

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
ROPE_THETA = 10000.0
ROTARY_FRACTION = 0.5

#: (config field, value the loader implements, default of THUDM's ChatGLMConfig, what a different value means)
REQUIRED_FLAGS: tuple[tuple[str, Any, Any, str], ...] = (
    ("rmsnorm", True, True, "LayerNorm instead of RMSNorm"),
    ("post_layer_norm", True, True, "no final layer norm"),
    ("apply_residual_connection_post_layernorm", False, False, "residual taken after the layer norm"),
    ("add_bias_linear", False, False, "biases on dense / MLP projections"),
    ("original_rope", True, True, "a rotary variant other than the original"),
    ("fp32_residual_connection", False, False, "float32 residual stream"),
)
#: Config fields whose presence (non-null, non-zero) means a variant this loader does not implement.
REFUSED_FIELDS: tuple[tuple[str, str], ...] = (
    ("pre_seq_len", "p-tuning v2 (prefix encoder) checkpoints are not supported"),
)
#: `quantization_bit` values this loader reads (0 / absent: floating point; 4: chatglm2-6b-int4).
SUPPORTED_QUANTIZATION_BITS = (0, 4)
#: What `chat()` / `stream_chat()` of the original default `max_length` to, for a 32k (rope_ratio) model.
LONG_CONTEXT_MAX_LENGTH = 32768
SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "padded_vocab_size",
    "seq_length",
    "layernorm_epsilon",
)

TOP_LEVEL_NAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
QKV_NAMES = {"self_attention.query_key_value.weight": "weight", "self_attention.query_key_value.bias": "bias"}
DROPPED_NAMES = frozenset({"transformer.rotary_pos_emb.inv_freq"})
LAYER_PATTERN = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")
MADV_DONTNEED = 4  # Linux: drop these pages from the process; a file mapping reads them again if touched
LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


@dataclass(frozen=True)
class ChatGLM2Shape:
    """The sizes and switches of a ChatGLM2 checkpoint that the conversion needs."""

    layers: int
    hidden: int
    heads: int
    head_dim: int  # kv_channels
    kv_heads: int  # multi_query_group_num, or heads without multi-query attention
    ffn: int
    vocab: int  # padded_vocab_size
    seq_length: int
    eps: float
    qkv_bias: bool
    multi_query: bool
    rope_ratio: float = 1.0  # positions are divided by it (chatglm2-6b-32k: 16)
    quantization_bit: int = 0  # 0: floating point; 4: packed int4 linears (chatglm2-6b-int4)


@dataclass(frozen=True)
class CheckpointFiles:
    """The weight files to read, in order, and the tensor names they hold when an index says so."""

    shards: tuple[Path, ...]
    names: frozenset[str] | None


def is_chatglm2_dir(path: Path) -> bool:
    """True when `path/config.json` is JSON with `model_type: "chatglm"` (the THUDM layout)."""
    try:
        config = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "chatglm"


def read_config(path: Path) -> dict[str, Any]:
    """`config.json` as a plain dict, never through `AutoConfig` (which would want the remote code)."""
    if not is_chatglm2_dir(path):
        raise ValueError(f"{path}: not a ChatGLM2 checkpoint (need {CONFIG_FILE} with model_type 'chatglm')")
    return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))


def check_supported(config: dict[str, Any]) -> None:
    """Raise ValueError naming the first config field that asks for maths this loader does not implement."""
    name = str(config.get("_name_or_path", ""))
    if re.search(r"chatglm3|glm-4", name, re.IGNORECASE):
        raise ValueError(
            f"_name_or_path={name!r}: only ChatGLM2 is supported (ChatGLM3/GLM-4 chat differently)"
        )
    for field, message in REFUSED_FIELDS:
        if config.get(field):
            raise ValueError(f"{field}={config[field]!r}: {message}")
    bits = config.get("quantization_bit") or 0
    if bits not in SUPPORTED_QUANTIZATION_BITS:
        raise ValueError(f"quantization_bit={bits!r} is not supported; only 4 (chatglm2-6b-int4) and "
                         "unquantized checkpoints are")
    for field, wanted, default, meaning in REQUIRED_FLAGS:
        value = config.get(field, default)
        if value != wanted:
            raise ValueError(f"{field}={value!r} is not supported ({meaning}); only {field}={wanted!r} is")
    ratio = config.get("rope_ratio", 1)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < float("inf"):
        raise ValueError(f"rope_ratio={ratio!r}: must be a positive number (positions are divided by it)")
    missing = [field for field in SHAPE_FIELDS if config.get(field) is None]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")


def parse_shape(config: dict[str, Any]) -> ChatGLM2Shape:
    """The checkpoint's shape from its config, after `check_supported`."""
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("kv_channels") or hidden // heads)
    multi_query = bool(config.get("multi_query_attention", False))
    kv_heads = int(config.get("multi_query_group_num", 1)) if multi_query else heads
    if kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"multi_query_group_num={kv_heads} does not divide num_attention_heads={heads}")
    if head_dim % 4:
        raise ValueError(f"kv_channels={head_dim}: must be a multiple of 4 (half of it rotates in pairs)")
    return ChatGLM2Shape(
        layers=int(config["num_layers"]),
        hidden=hidden,
        heads=heads,
        head_dim=head_dim,
        kv_heads=kv_heads,
        ffn=int(config["ffn_hidden_size"]),
        vocab=int(config["padded_vocab_size"]),
        seq_length=int(config["seq_length"]),
        eps=float(config["layernorm_epsilon"]),
        qkv_bias=bool(config.get("add_qkv_bias", False)),
        multi_query=multi_query,
        rope_ratio=float(config.get("rope_ratio", 1)),
        quantization_bit=int(config.get("quantization_bit") or 0),
    )


def rope_parameters(shape: ChatGLM2Shape) -> dict[str, Any]:
    """GLM rotary settings: base 10000 on half of each head; positions / rope_ratio as `linear` scaling."""
    base = {"rope_theta": ROPE_THETA, "partial_rotary_factor": ROTARY_FRACTION}
    if shape.rope_ratio == 1:
        return {"rope_type": "default", **base}
    return {"rope_type": "linear", "factor": shape.rope_ratio, **base}


def default_max_length(shape: ChatGLM2Shape) -> int | None:
    """The original chat's `max_length` default where it differs from api.py's: 32768 for a 32k model,
    cut to the context. None for the others."""
    return min(LONG_CONTEXT_MAX_LENGTH, shape.seq_length) if shape.rope_ratio != 1 else None


def to_glm_config(shape: ChatGLM2Shape, eos_id: int, pad_id: int) -> GlmConfig:
    """The native GLM config that computes what ChatGLM2 computes."""
    return GlmConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        hidden_act="silu",
        max_position_embeddings=shape.seq_length,
        rms_norm_eps=shape.eps,
        attention_bias=shape.qkv_bias,
        tie_word_embeddings=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        rope_parameters=rope_parameters(shape),
    )


def read_index(index: Path) -> CheckpointFiles:
    """Shards named by a `*.index.json` weight map, each once, in order of first appearance."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index.name}: unreadable shard index ({err})") from err
    shards = tuple(index.parent / name for name in dict.fromkeys(weight_map.values()))
    absent = [shard.name for shard in shards if not shard.is_file()]
    if absent:
        raise ValueError(f"missing weight shards listed in {index.name}: {', '.join(absent)}")
    return CheckpointFiles(shards, frozenset(weight_map))


def find_weights(path: Path) -> CheckpointFiles:
    """Safetensors (sharded or single) first, then `pytorch_model*.bin`; ValueError when there are none."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (path / index_name).is_file():
            return read_index(path / index_name)
        if (path / single_name).is_file():
            return CheckpointFiles((path / single_name,), None)
    orphans = sorted(p.name for p in [*path.glob("pytorch_model-*.bin"), *path.glob("model-*.safetensors")])
    hint = f" (found {', '.join(orphans)} but no shard index)" if orphans else ""
    raise ValueError(
        f"{path}: no weights: need model.safetensors[.index.json] or pytorch_model.bin[.index.json]{hint}"
    )


def target_names(name: str, shape: ChatGLM2Shape) -> tuple[str, ...]:
    """GLM parameter names that ChatGLM2 tensor `name` fills (for a part of an int4 linear: the GLM
    modules it builds); () when it is dropped."""
    if name in DROPPED_NAMES:
        return ()
    quantized = chatglm2_int4.split_name(name) if shape.quantization_bit else None
    if quantized:
        return chatglm2_int4.glm_modules(quantized[0])
    if name in TOP_LEVEL_NAMES:
        return (TOP_LEVEL_NAMES[name],)
    match = LAYER_PATTERN.fullmatch(name)
    if match:
        prefix, rest = f"model.layers.{match[1]}.", match[2]
        if rest in LAYER_NAMES:
            return (prefix + LAYER_NAMES[rest],)
        if rest in QKV_NAMES:
            return tuple(f"{prefix}self_attn.{p}_proj.{QKV_NAMES[rest]}" for p in "qkv")
    raise ValueError(f"unexpected tensor {name!r} in checkpoint (not part of a plain ChatGLM2 model)")


def split_qkv(fused: torch.Tensor, shape: ChatGLM2Shape) -> tuple[torch.Tensor, ...]:
    """Split `query_key_value` rows into q [heads*d, ...], k and v [kv_heads*d, ...], as views if possible."""
    d, heads, kv = shape.head_dim, shape.heads, shape.kv_heads
    rows = (heads + 2 * kv) * d
    if fused.shape[0] != rows:
        raise ValueError(f"query_key_value has {fused.shape[0]} rows, expected {rows} from the config")
    if shape.multi_query:
        return fused.split([heads * d, kv * d, kv * d], dim=0)
    per_head = fused.view(heads, 3, d, *fused.shape[1:])  # [heads, (q, k, v), d, hidden?]
    return tuple(per_head[:, i].reshape(heads * d, *fused.shape[1:]) for i in range(3))


def convert_tensor(
    name: str, tensor: torch.Tensor, shape: ChatGLM2Shape
) -> Iterator[tuple[str, torch.Tensor]]:
    """(GLM name, tensor) pairs for one ChatGLM2 tensor."""
    targets = target_names(name, shape)
    is_qkv = name.endswith(tuple(QKV_NAMES))
    parts = split_qkv(tensor, shape) if is_qkv else (tensor,) * len(targets)
    yield from zip(targets, parts, strict=True)


def load_torch_shard(shard: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A `.bin` shard, memory-mapped where its format allows (then True), weights only (no pickled code
    runs)."""
    mapped = True
    try:
        try:
            state = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:  # the pre-zipfile format cannot be mapped
            if "mmap" not in str(err):
                raise
            state, mapped = torch.load(shard, map_location="cpu", weights_only=True), False
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{shard.name}: not a readable weights-only torch checkpoint ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{shard.name}: expected a dict of tensors")
    return state, mapped


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the whole pages of a memory-mapped tensor from this process's memory (Linux; elsewhere a no-op).

    Only for tensors backed by a read-only use of a file mapping: a later read maps the pages again from
    the file, so the tensor stays valid; it just stops counting towards RSS until touched."""
    if LIBC is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the tensor only
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def iter_shard(shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of one shard, releasing each as soon as the caller moves on.

    A memory-mapped `.bin` shard's pages are dropped tensor by tensor, so a single-file checkpoint (the
    3.9 GB chatglm2-6b-int4) never sits in memory whole next to the model being filled."""
    if shard.suffix == ".safetensors":
        with safe_open(str(shard), framework="pt", device="cpu") as reader:
            for name in reader.keys():
                yield name, reader.get_tensor(name)
        return
    state, mapped = load_torch_shard(shard)
    for name in list(state):
        tensor = state.pop(name)
        yield name, tensor
        if mapped:
            release_pages(tensor)


def build_empty_model(
    config: GlmConfig, dtype: torch.dtype, device: torch.device, quantized: bool = False, head: bool = False
) -> GlmForCausalLM:
    """An uninitialised `GlmForCausalLM` whose parameters are allocated once, in `dtype` on `device`.
    `quantized`: its int4 linears are `PendingLinear`s, allocated only when their packed weights are read;
    `head`: so is its LM head (quantized when read, for `--quantize`)."""
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    if quantized:
        chatglm2_int4.defer_linears(model)
    if head:
        lm_head = model.lm_head
        model.lm_head = chatglm2_int4.PendingLinear(lm_head.in_features, lm_head.out_features, bias=False)
    model = model.to(dtype=dtype).to_empty(device=device)
    # to_empty leaves buffers uninitialised and .to(dtype) would round inv_freq; rebuild it in float32.
    model.model.rotary_emb = GlmRotaryEmbedding(config).to(device)
    return model.requires_grad_(False)


def copy_tensor(params: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """Copy (and cast) `value` into parameter `name`, checking its shape."""
    target = params[name]
    if not value.is_floating_point():
        raise ValueError(f"{name}: {value.dtype} weights (a quantized checkpoint?) are not supported")
    if target.shape != value.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(value.shape)}, config implies {tuple(target.shape)}"
        )
    target.copy_(value)


def fill_model(model: GlmForCausalLM, files: CheckpointFiles, shape: ChatGLM2Shape,
               quantize: Quantization = Quantization.NONE) -> None:
    """Copy every checkpoint tensor into `model`, shard by shard, and build its int4 linears from their
    packed weights, or (`quantize`) quantize its dense linears as they are read; ValueError on anything
    missing or extra."""
    params = dict(model.named_parameters())
    deferred = chatglm2_int4.pending_names(model)
    wanted = set(params) | deferred
    dense: dict[str, dict[str, torch.Tensor]] = {}  # a linear deferred for `quantize` -> its parts read so far
    if files.names is not None:  # fail before reading gigabytes
        targets = {t for name in files.names for t in target_names(name, shape)}
        check_coverage({t.rpartition(".")[0] if t.rpartition(".")[0] in deferred else t for t in targets}, wanted)
    filled: set[str] = set()
    packed: dict[str, dict[str, torch.Tensor]] = {}  # int4 linear -> its parts read so far
    with torch.no_grad():
        for shard in files.shards:
            for name, tensor in iter_shard(shard):
                quantized = chatglm2_int4.split_name(name) if shape.quantization_bit else None
                if quantized:
                    filled.update(collect_int4(model, packed, quantized, tensor, shape))
                    continue
                for target, value in convert_tensor(name, tensor, shape):
                    module, _, part = target.rpartition(".")
                    if module in deferred:
                        filled.update(quantize_when_read(model, dense, module, part, value, quantize))
                        continue
                    copy_tensor(params, target, value)
                    filled.add(target)
    if packed:
        raise ValueError(f"quantization_bit=4, but the checkpoint lacks the weight or weight_scale of int4 "
                         f"linears: {sorted(packed)[:8]}")
    if dense:
        raise ValueError(f"the checkpoint lacks the weight or bias of linears: {sorted(dense)[:8]}")
    check_coverage(filled, wanted)


def collect_int4(
    model: GlmForCausalLM,
    packed: dict[str, dict[str, torch.Tensor]],
    quantized: tuple[str, str],
    tensor: torch.Tensor,
    shape: ChatGLM2Shape,
) -> tuple[str, ...]:
    """Keep one part of an int4 linear; once all its parts are read, build its modules and return their
    GLM names (else ())."""
    linear, part = quantized
    if part == "weight" and tensor.dtype != torch.int8:
        raise ValueError(f"{linear}.weight: quantization_bit=4 wants int8 packed weights, got {tensor.dtype}")
    parts = packed.setdefault(linear, {})
    # Unpacked now, so the memory-mapped bytes are read once and their pages can be dropped (iter_shard).
    parts[part] = chatglm2_int4.unpack_int4(tensor) if part == "weight" else tensor
    is_qkv = linear.endswith("query_key_value")
    if not chatglm2_int4.is_complete(parts, is_qkv and shape.qkv_bias):
        return ()
    split = (lambda rows: split_qkv(rows, shape)) if is_qkv else (lambda rows: (rows,))
    embedding = model.get_input_embeddings().weight
    dtype, device = embedding.dtype, embedding.device
    return chatglm2_int4.build_linears(model, linear, packed.pop(linear), split, dtype, device)


def quantize_when_read(model: GlmForCausalLM, parts: dict[str, dict[str, torch.Tensor]], module: str, part: str,
                       value: torch.Tensor, mode: Quantization) -> tuple[str, ...]:
    """Keep one part (weight or bias) of a dense linear deferred for `--quantize`; once all its parts are read,
    put its quantized form in place and return its name (else ()). Only one dense layer is held at a time,
    so a model too big for memory in float32 still loads."""
    slot = model.get_submodule(module)
    got = parts.setdefault(module, {})
    got[part] = value
    if "weight" not in got or (slot.has_bias and "bias" not in got):
        return ()
    got = parts.pop(module)
    embedding = model.get_input_embeddings().weight
    dtype, device = embedding.dtype, embedding.device
    weight = got["weight"]
    if tuple(weight.shape) != (slot.out_features, slot.in_features):
        raise ValueError(f"{module}.weight: checkpoint shape {tuple(weight.shape)}, config implies "
                         f"{(slot.out_features, slot.in_features)}")
    if mode == Quantization.INT4 and kernel_fits(*weight.shape, INT4_GROUP, device, torch.bfloat16):
        # quantized from the checkpoint's own floats, a block of rows at a time: no whole copy in `dtype` (the
        # LM head's would be 1 GB of float32); the same result, as the conversion to float32 is exact
        with torch.device("meta"):
            layer = torch.nn.Linear(slot.in_features, slot.out_features, bias="bias" in got)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        if "bias" in got:
            layer.bias = torch.nn.Parameter(got["bias"], requires_grad=False)
    else:
        layer = dense_linear(weight, got.get("bias"), device, dtype)
    model.set_submodule(module, quantize_linear(layer, mode))
    return (module,)


def check_coverage(provided: set[str], wanted: set[str]) -> None:
    """ValueError listing GLM parameters that the checkpoint leaves unfilled or that the model lacks."""
    if provided - wanted:
        raise ValueError(
            f"checkpoint tensors the config does not account for: {sorted(provided - wanted)[:8]}"
        )
    if wanted - provided:
        raise ValueError(f"checkpoint lacks tensors for: {sorted(wanted - provided)[:8]}")


def load_tokenizer(path: Path, vocab: int) -> ChatGLM2Tokenizer:
    """The sentencepiece tokenizer, checked against the model's vocab."""
    model_file = path / TOKENIZER_FILE
    if not model_file.is_file():
        raise ValueError(f"{path}: missing {TOKENIZER_FILE} (the sentencepiece model)")
    try:
        tokenizer = ChatGLM2Tokenizer(model_file)
    except (OSError, RuntimeError) as err:
        raise ValueError(f"{model_file}: not a sentencepiece model ({err})") from err
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"{TOKENIZER_FILE} needs {tokenizer.vocab_size} ids, padded_vocab_size is {vocab}")
    return tokenizer


@dataclass(frozen=True)
class Checkpoint:
    """A ChatGLM2 directory read as far as is cheap: its config, shape, tokenizer and weight files, no weights."""

    path: Path
    shape: ChatGLM2Shape
    tokenizer: ChatGLM2Tokenizer
    files: CheckpointFiles

    def glm_config(self) -> GlmConfig:
        return to_glm_config(self.shape, self.tokenizer.eos_id, self.tokenizer.pad_id)


def open_checkpoint(path: Path) -> Checkpoint:
    """Read and check a THUDM ChatGLM2-6B directory's config and tokenizer and find its weight files."""
    path = Path(path)
    config = read_config(path)
    check_supported(config)
    shape = parse_shape(config)
    tokenizer = load_tokenizer(path, shape.vocab)
    return Checkpoint(path, shape, tokenizer, find_weights(path))


def empty_model(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device,
                quantize: Quantization = Quantization.NONE) -> GlmForCausalLM:
    """The model `fill_model` fills for `quantize` (on the meta device: the skeleton the weight cache fills)."""
    quantized = quantize in (Quantization.INT8, Quantization.INT4)
    return build_empty_model(checkpoint.glm_config(), dtype, torch.device(device),
                             quantized=checkpoint.shape.quantization_bit == 4 or quantized, head=quantized)


def finish(checkpoint: Checkpoint, model: GlmForCausalLM) -> LoadedModel:
    """The filled `model`, eval mode, with its tokenizer, as the server serves it."""
    tokenizer = checkpoint.tokenizer
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=f"ChatGLM2 ({checkpoint.path.resolve().name})",
        context_length=checkpoint.shape.seq_length,
        default_max_length=default_max_length(checkpoint.shape),
    )


def load_chatglm2(path: Path, dtype: torch.dtype, device: torch.device,
                  quantize: Quantization = Quantization.NONE) -> LoadedModel:
    """Load a THUDM ChatGLM2-6B directory as a native, eval-mode `GlmForCausalLM` plus its tokenizer. With
    `quantize` (int8, int4), a dense checkpoint's linears, the LM head included, are quantized one by one as
    they are read."""
    checkpoint = open_checkpoint(path)
    model = empty_model(checkpoint, dtype, device, quantize)
    fill_model(model, checkpoint.files, checkpoint.shape, quantize)
    return finish(checkpoint, model)
