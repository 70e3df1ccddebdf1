"""Write a randomly initialised ChatGLM2-6B checkpoint in THUDM's original file layout.

Same shapes, names, config keys (auto_map included), shard count and float16 dtype as `THUDM/chatglm2-6b`:
28 layers, hidden 4096, 32 heads of 128, 2 key/value groups, FFN 13696, padded vocab 65024, 7 shards of
`pytorch_model-0000N-of-00007.bin` plus `pytorch_model.bin.index.json`. About 12.5 GB. Tensors are made
one shard at a time, so writing needs about one shard (~1.8 GB) of memory.

Variants (`--variant`):

* `6b` (default): `THUDM/chatglm2-6b` as above.
* `32k`: `THUDM/chatglm2-6b-32k`: the same tensors, `rope_ratio: 16` in the config.
* `int4`: `THUDM/chatglm2-6b-int4`: one `pytorch_model.bin` (no index), float16 apart from the four linears
  of each layer, which the original's rule quantizes from the random float16 weights
  (`scale = |w|.max(row) / 7` in float16, `q = round(w / scale)` as int8) and packs two to a byte, element
  2j in the high nibble: `weight` int8 [out, in / 2] plus `weight_scale` float16 [out]. About 3.9 GB;
  writing it holds the whole file in memory (~4 GB) once.

The tokenizer is the fixture's tiny sentencepiece model (1000 pieces, specials 1000..1004), not the real
64789-piece one: ids 1005..65023 are padding ids that the tokenizer drops when decoding. That is enough to
measure loading and decoding speed; the text is gibberish anyway.

    python -m scripts.make_random_chatglm2 [--variant 6b|32k|int4] [--out /work/ckpt/chatglm2-6b-random]
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "chatglm2-tiny"
DEFAULT_OUT = Path("/work/ckpt/chatglm2-6b-random")
WEIGHT_STD = 0.02
VARIANTS = ("6b", "32k", "int4")
RATIO_32K = 16
#: The linears chatglm2-6b-int4 stores as packed int4 with a per-row scale.
QUANTIZED_SUFFIXES = (
    "self_attention.query_key_value.weight",
    "self_attention.dense.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)
INT4_MAX = 7  # 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class Spec:
    """Sizes of the checkpoint to write."""

    layers: int = 28
    hidden: int = 4096
    heads: int = 32
    head_dim: int = 128
    groups: int = 2
    ffn: int = 13696
    vocab: int = 65024
    seq_length: int = 32768
    shards: int = 7


def auto_map(variant: str) -> dict[str, str]:
    """The `auto_map` each original checkpoint ships (the int4 one has no AutoModelForCausalLM entry)."""
    auto = "modeling_chatglm.ChatGLMForConditionalGeneration"
    entries = {"AutoConfig": "configuration_chatglm.ChatGLMConfig", "AutoModel": auto}
    if variant != "int4":
        entries["AutoModelForCausalLM"] = auto
    entries["AutoModelForSeq2SeqLM"] = auto
    if variant == "6b":
        entries["AutoModelForSequenceClassification"] = "modeling_chatglm.ChatGLMForSequenceClassification"
    return entries


def original_config(spec: Spec, variant: str = "6b") -> dict[str, object]:
    """config.json as THUDM/chatglm2-6b (or its -32k / -int4 sibling) ships it, with `spec`'s sizes."""
    suffix = "" if variant == "6b" else f"-{variant}"
    config: dict[str, object] = {
        "_name_or_path": f"THUDM/chatglm2-6b{suffix}",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": auto_map(variant),
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": spec.ffn,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": spec.hidden,
        "kv_channels": spec.head_dim,
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": spec.groups,
        "num_attention_heads": spec.heads,
        "num_layers": spec.layers,
        "original_rope": True,
        "padded_vocab_size": spec.vocab,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": spec.seq_length,
        "use_cache": True,
        "torch_dtype": "float16",
        "transformers_version": "4.27.1",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if variant == "32k":
        config["rope_ratio"] = RATIO_32K
    if variant == "int4":
        config["quantization_bit"] = 4
    return config


def tensor_shapes(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """(ChatGLM2 name, shape) of every tensor, in the original's order."""
    qkv_rows = (spec.heads + 2 * spec.groups) * spec.head_dim
    shapes = [("transformer.embedding.word_embeddings.weight", (spec.vocab, spec.hidden))]
    for i in range(spec.layers):
        layer = f"transformer.encoder.layers.{i}."
        shapes += [
            (layer + "input_layernorm.weight", (spec.hidden,)),
            (layer + "self_attention.query_key_value.weight", (qkv_rows, spec.hidden)),
            (layer + "self_attention.query_key_value.bias", (qkv_rows,)),
            (layer + "self_attention.dense.weight", (spec.hidden, spec.heads * spec.head_dim)),
            (layer + "post_attention_layernorm.weight", (spec.hidden,)),
            (layer + "mlp.dense_h_to_4h.weight", (2 * spec.ffn, spec.hidden)),
            (layer + "mlp.dense_4h_to_h.weight", (spec.hidden, spec.ffn)),
        ]
    shapes += [
        ("transformer.encoder.final_layernorm.weight", (spec.hidden,)),
        ("transformer.output_layer.weight", (spec.vocab, spec.hidden)),
        ("transformer.rotary_pos_emb.inv_freq", (spec.head_dim // 4,)),
    ]
    return shapes


def split_into_shards(shapes: list[tuple[str, tuple[int, ...]]], count: int) -> list[list[str]]:
    """Consecutive groups of names of roughly equal bytes, `count` of them."""
    sizes = [torch.Size(shape).numel() for _, shape in shapes]
    budget = sum(sizes) / count
    shards: list[list[str]] = [[]]
    filled = 0
    for (name, _), size in zip(shapes, sizes, strict=True):
        if filled + size > budget * len(shards) and shards[-1] and len(shards) < count:
            shards.append([])
        shards[-1].append(name)
        filled += size
    return shards


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A float16 tensor for `name`: norms are ones, inv_freq as the original, the rest N(0, 0.02)."""
    if name.endswith("layernorm.weight"):
        return torch.ones(shape, dtype=torch.float16)
    if name.endswith("inv_freq"):
        dim = 2 * shape[0]
        return (1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)).half()
    return torch.empty(shape, dtype=torch.float16).normal_(0.0, WEIGHT_STD, generator=generator)


def make_shard(
    names: list[str], shapes: dict[str, tuple[int, ...]], seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one shard, made one after another."""
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        yield name, random_tensor(name, shapes[name], generator)


def quantize_row_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The original `half_weight_to_int(weight, 4)` + `compress_int4_weight`: float16 [out, in] ->
    (int8 [out, in / 2], element 2j in the high nibble; float16 scale [out])."""
    scale = weight.abs().max(dim=-1).values / INT4_MAX  # float16, as the original computes it
    q = torch.round(weight / scale[:, None]).to(torch.int16)  # [out, in], -7..7
    pairs = (q & 0x0F).view(q.shape[0], -1, 2)  # [out, in / 2, (2j, 2j + 1)]
    packed = (pairs[..., 0] << 4) | pairs[..., 1]  # 0..255
    return packed.to(torch.uint8).view(torch.int8), scale


def int4_tensors(names: list[str], shapes: dict[str, tuple[int, ...]], seed: int
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """The int4 checkpoint's tensors: float16, except each quantized linear's packed weight and its scale."""
    for name, tensor in make_shard(names, shapes, seed):
        if name.endswith(QUANTIZED_SUFFIXES):
            packed, scale = quantize_row_int4(tensor)
            yield name, packed
            yield name + "_scale", scale
        else:
            yield name, tensor


def write_int4_checkpoint(out: Path, spec: Spec, seed: int) -> None:
    """One `pytorch_model.bin` holding every tensor, as THUDM/chatglm2-6b-int4 ships it."""
    names = [name for name, _ in tensor_shapes(spec)]
    state = dict(int4_tensors(names, dict(tensor_shapes(spec)), seed))
    torch.save(state, out / "pytorch_model.bin")
    print(f"wrote pytorch_model.bin: {len(state)} tensors", flush=True)


def write_checkpoint(out: Path, spec: Spec, tokenizer: Path, seed: int, variant: str = "6b") -> None:
    """All files of the checkpoint; only one shard's tensors are in memory at a time (int4: the one file)."""
    out.mkdir(parents=True, exist_ok=True)
    if variant == "int4":
        write_int4_checkpoint(out, spec, seed)
    else:
        write_float_shards(out, spec, seed)
    (out / "config.json").write_text(json.dumps(original_config(spec, variant), indent=2), encoding="utf-8")
    shutil.copyfile(FIXTURE / "tokenizer_config.json", out / "tokenizer_config.json")
    shutil.copyfile(tokenizer, out / "tokenizer.model")


def write_float_shards(out: Path, spec: Spec, seed: int) -> None:
    """float16 shards plus their `pytorch_model.bin.index.json`."""
    shapes = dict(tensor_shapes(spec))
    groups = split_into_shards(list(shapes.items()), spec.shards)
    weight_map: dict[str, str] = {}
    total = 0
    for index, names in enumerate(groups, 1):
        file = f"pytorch_model-{index:05d}-of-{len(groups):05d}.bin"
        shard = dict(make_shard(names, shapes, seed + index))
        torch.save(shard, out / file)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(names, file))
        print(f"wrote {file}: {len(names)} tensors", flush=True)
        del shard
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index_json, indent=2), encoding="utf-8")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=VARIANTS, default="6b",
                        help="6b (float16 shards), 32k (rope_ratio 16) or int4 (packed 4-bit linears)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tokenizer", type=Path, default=FIXTURE / "tokenizer.model")
    parser.add_argument("--layers", type=int, default=Spec.layers, help="fewer layers for a quick try")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    write_checkpoint(args.out, Spec(layers=args.layers), args.tokenizer, args.seed, args.variant)
    print(f"done: {args.out}")


if __name__ == "__main__":
    main()
