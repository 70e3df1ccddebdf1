"""Llama-family GGUF files loaded straight into torch: Q4_0 / Q4_1 layers into packed int4 (`Int4Linear`),
without going through float32, and everything else into the compute dtype.

The shipped SmolLM2 file is Q4_1 for every layer weight, Q8_0 for the tied embedding and F32 for the norms.
Q4_1 blocks hold 32 weights as w = d * q + m (q in 0..15); that is (q - 8) * d + (m + 8 d), torch's int4
layout with scale d and zero m + 8 d, so nothing is re-quantized. llama.cpp stores q/k rows permuted for its
rotary; they are put back in transformers' order, as transformers' own GGUF loader does.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from service.models.quant.int4 import Int4Linear, dense_linear, dequantize
from service.models.quant.quantize import Int8Linear

log = logging.getLogger(__name__)

BLOCK = 32  # weights per Q4_0 / Q4_1 / Q8_0 block
INT4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
DENSE_COPY_LIMIT = 1 << 30  # bytes of dense prefill copies a model may keep beside its packed weights

# GGUF tensor name (after "blk.N.") -> transformers module path (after "model.layers.N.")
LAYER_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


# bytes per block of 32 weights, per tensor type this module reads
BLOCK_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20, GGMLQuantizationType.Q8_0: 34}
ITEM_BYTES = {GGMLQuantizationType.F32: 4, GGMLQuantizationType.F16: 2}
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # innermost dimension first, as GGUF lists them
    data: np.ndarray  # raw: [rows, bytes per row] uint8 for block types, the values for F32 / F16


@dataclass
class GGUFFile:
    metadata: dict  # scalars and strings; arrays as their length only (the vocabulary is not needed here)
    tensors: dict[str, GGUFTensor]


class _Cursor:
    def __init__(self, buffer: memoryview):
        self.buffer, self.offset = buffer, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from(fmt, self.buffer, self.offset)[0]
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.unpack("<Q")
        self.offset += size
        return bytes(self.buffer[self.offset - size:self.offset]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item == STRING:
                for _ in range(count):
                    size = self.unpack("<Q")
                    self.offset += size
            else:
                self.offset += count * struct.calcsize(SCALARS[item])
            return count
        return self.unpack(SCALARS[kind])


def read_gguf(path: Path) -> GGUFFile:
    """The metadata and tensor index of a GGUF file, tensors memory-mapped. The gguf package's reader
    decodes every vocabulary string into numpy views (seconds); this only skips over them."""
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(mapped))
    if cursor.unpack("<I") != 0x46554747:  # b"GGUF"
        raise ValueError(f"{path}: not a GGUF file")
    version, tensor_count, kv_count = cursor.unpack("<I"), cursor.unpack("<Q"), cursor.unpack("<Q")
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        shape = tuple(cursor.unpack("<Q") for _ in range(cursor.unpack("<I")))
        infos.append((name, GGMLQuantizationType(cursor.unpack("<I")), shape, cursor.unpack("<Q")))
    alignment = metadata.get("general.alignment", 32)
    start = -(-cursor.offset // alignment) * alignment
    tensors = {}
    for name, kind, shape, offset in infos:
        count = int(np.prod(shape))
        if kind in BLOCK_BYTES:
            rows = count // shape[0]
            data = mapped[start + offset:start + offset + count // BLOCK * BLOCK_BYTES[kind]].reshape(rows, -1)
        elif kind in ITEM_BYTES:
            dtype = np.float32 if kind == GGMLQuantizationType.F32 else np.float16
            data = mapped[start + offset:start + offset + count * ITEM_BYTES[kind]].view(dtype)
        else:
            data = None  # read_dense says which type is missing, if the tensor is ever used
        tensors[name] = GGUFTensor(name, kind, shape, data)
    return GGUFFile(metadata, tensors)


def llama_config(gguf: GGUFFile):
    """A transformers LlamaConfig from a Llama-family GGUF file's metadata."""
    from transformers import LlamaConfig

    meta = gguf.metadata
    arch = meta.get("general.architecture")
    get = lambda name, default=None: meta.get(f"{arch}.{name}", default)  # noqa: E731
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    return LlamaConfig(
        vocab_size=meta.get("tokenizer.ggml.tokens") or gguf.tensors["token_embd.weight"].shape[1],
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", hidden // heads),
        max_position_embeddings=get("context_length", 2048),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=get("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def unpack_int4(kind: GGMLQuantizationType, raw: np.ndarray, rows: int, cols: int):
    """Raw Q4_0 / Q4_1 blocks [rows, cols / 32 * bytes] -> q [rows, cols] uint8 in 0..15, scale and zero
    [rows, cols / 32] float32, with W = (q - 8) * scale + zero."""
    head = 4 if kind == GGMLQuantizationType.Q4_1 else 2  # d (and m) as float16
    blocks = raw.reshape(rows, cols // BLOCK, head + BLOCK // 2)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # [rows, groups]
    packed = blocks[..., head:]  # [rows, groups, 16]: weight j in the low nibble, weight j + 16 in the high
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(rows, cols)
    if kind == GGMLQuantizationType.Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8 * d
    else:
        zero = np.zeros_like(d)
    return torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(zero)


def dequantize_q8_0(raw: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    """Raw Q8_0 blocks (float16 d, 32 int8) -> float32 [rows, cols]."""
    blocks = raw.reshape(rows, cols // BLOCK, 2 + BLOCK)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # [rows, groups, 1]
    q = blocks[..., 2:].copy().view(np.int8).astype(np.float32)  # [rows, groups, 32]
    return torch.from_numpy((q * d).reshape(rows, cols))


def read_dense(tensor) -> torch.Tensor:
    """A tensor of any type this module reads, as float32 [rows, cols] (or [n] for vectors)."""
    shape = [int(n) for n in reversed(tensor.shape)]  # GGUF lists dims innermost first
    kind = tensor.tensor_type
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(shape))
    if kind == GGMLQuantizationType.Q8_0:
        return dequantize_q8_0(tensor.data, *shape)
    if kind in INT4_TYPES:
        return dequantize(*unpack_int4(kind, tensor.data, *shape), BLOCK)
    raise ValueError(f"GGUF tensor {tensor.name}: type {kind.name} is not supported (Q4_0, Q4_1, Q8_0, F16, F32 are)")


def unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's rotary permutation of a q or k weight with `heads` heads."""
    index = np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(rows)
    return torch.from_numpy(index)


def linear_from_gguf(tensor, heads: int | None, quantized: bool, device: torch.device,
                     dtype: torch.dtype, prefill_dtype: torch.dtype | None = None) -> nn.Module:
    """The layer for one GGUF weight: packed int4 where the file is 4-bit (and `quantized`), else dense."""
    rows, cols = (int(n) for n in reversed(tensor.shape))
    order = unpermute_rows(rows, heads) if heads else None
    if quantized and tensor.tensor_type in INT4_TYPES:
        q, scale, zero = unpack_int4(tensor.tensor_type, tensor.data, rows, cols)
        if order is not None:
            q, scale, zero = q[order], scale[order], zero[order]
        # torch's int4 CPU kernel runs fast only on bfloat16 inputs (measured: 0.14 ms against 7.7 ms in float32)
        compute = torch.bfloat16 if device.type == "cpu" else dtype
        layer = Int4Linear.from_quantized(q, scale, zero, BLOCK, device=device, compute_dtype=compute)
        if prefill_dtype is not None and isinstance(layer, Int4Linear):
            layer.keep_dense(dequantize(q, scale, zero, BLOCK).to(prefill_dtype))
        return layer
    weight = read_dense(tensor)
    if order is not None:
        weight = weight[order]
    return dense_linear(weight, None, device, dtype)


def dense_prefill_dtype(gguf: GGUFFile, device: torch.device) -> torch.dtype | None:
    """Small models keep a dense copy of their 4-bit layers for prefills (see Int4Linear.DENSE_FROM_ROWS), in
    the dtype dense matmuls are fast in here; models whose copy would pass DENSE_COPY_LIMIT don't."""
    from service.models.quant.precision import BYTES, fast_dtype

    if device.type != "cpu":
        return None
    dtype = fast_dtype(device)
    weights = sum(int(np.prod(t.shape)) for t in gguf.tensors.values() if t.tensor_type in INT4_TYPES)
    return dtype if weights * BYTES[dtype] <= DENSE_COPY_LIMIT else None


def int8_head(embedding: torch.Tensor, device: torch.device, dense_dtype: torch.dtype | None) -> nn.Module:
    """The LM head of a tied embedding [V, hidden] (Q8_0 in the file) as int8: on our own kernel with the file's
    own scales per group of 32 (read back exactly), else with one scale per row (7.9 ms against 16.7 ms float32
    at 1 row, AVX2). (An int4 head was faster still, 1.8 ms, but tipped the Paris answer.)
    With `dense_dtype`, a dense copy for many rows at once."""
    head = Int8Linear(embedding, None, torch.bfloat16 if device.type == "cpu" else embedding.dtype)
    if dense_dtype is not None:
        head.keep_dense(embedding.to(dense_dtype))
    return head


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _set_weight(root: nn.Module, path: str, weight: torch.Tensor) -> None:
    module = root.get_submodule(path)
    module.weight = nn.Parameter(weight, requires_grad=False)


def load_llama_gguf(gguf: GGUFFile, config, device: torch.device, dtype: torch.dtype, quantized: bool):
    """A transformers Llama model with weights read straight from the GGUF file."""
    from transformers import AutoModelForCausalLM

    tensors = gguf.tensors
    prefill_dtype = dense_prefill_dtype(gguf, device) if quantized else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}."
        for gguf_name, hf_name in LAYER_LINEARS.items():
            rotary_heads = {"attn_q": heads, "attn_k": kv_heads}.get(gguf_name)
            layer = linear_from_gguf(tensors[f"blk.{index}.{gguf_name}.weight"], rotary_heads, quantized,
                                     device, dtype, prefill_dtype)
            _set_module(model, prefix + hf_name, layer)
        for gguf_name, hf_name in LAYER_NORMS.items():
            norm = read_dense(tensors[f"blk.{index}.{gguf_name}.weight"])
            _set_weight(model, prefix + hf_name, norm.to(device, dtype))
    _set_weight(model, "model.norm", read_dense(tensors["output_norm.weight"]).to(device, dtype))
    embedding = read_dense(tensors["token_embd.weight"]).to(device, dtype)  # [V, hidden]
    _set_weight(model, "model.embed_tokens", embedding)
    if "output.weight" in tensors:
        _set_module(model, "lm_head", linear_from_gguf(tensors["output.weight"], None, quantized, device, dtype))
    elif quantized and device.type == "cpu":  # tied, but read every step: a quantized copy on our int8 kernel
        # (off the CPU, int8 is torch's naive kernel without tensor cores: the head reads the embedding densely)
        model.lm_head = int8_head(embedding, device, prefill_dtype)
        model.config.tie_word_embeddings = False
    else:  # tied: the LM head reads the embedding
        model.lm_head = dense_linear(embedding, None, device, dtype)
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.device(device):  # its buffers were made on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()
