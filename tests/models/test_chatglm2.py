"""ChatGLM2 loader and tokenizer against the golden fixture made by THUDM's original implementation.

The fixture (tests/data/chatglm2-tiny, see its README.md) is a tiny random ChatGLM2 in the original
file layout plus what the original code produced for it: prompt ids, last-position logits, greedy ids
and the `chat` / `stream_chat` texts. Everything here runs on CPU in a few seconds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import GlmForCausalLM

from service.models.base import LoadedModel
from service.models.chatglm2 import is_chatglm2_dir, load_chatglm2
from service.models.chatglm2_tokenizer import ChatGLM2Tokenizer
from service.models.quant.quantize import Quantization, quantize_model
from tests.models.chatglm2_golden import (
    golden_checks,
    greedy_runs_for,
    last_logits,
    logits_error,
    stream_texts,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "chatglm2-tiny"
EXPECTED: dict[str, Any] = json.loads((DATA / "expected.json").read_text(encoding="utf-8"))
CASES: list[dict[str, Any]] = EXPECTED["cases"]
CASE_IDS = [case["name"] for case in CASES]
CPU = torch.device("cpu")
LOGITS_TOLERANCE = 1e-4
MAX_NEW_TOKENS = 16
FIXTURE_CONFIG: dict[str, Any] = json.loads((DATA / "config.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- helpers


def read_fixture_state() -> dict[str, torch.Tensor]:
    """All original-layout tensors of the fixture, by ChatGLM2 name."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(DATA.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
    return state


def copy_fixture(dest: Path, config_edit: dict[str, Any] | None = None, drop_key: str | None = None) -> Path:
    """A copy of the fixture checkpoint in `dest`, its config.json edited (a None value deletes the key)."""
    shutil.copytree(DATA, dest, ignore=shutil.ignore_patterns("expected.json", "README.md"))
    for path in dest.iterdir():
        path.chmod(0o644)
    config = {**FIXTURE_CONFIG, **(config_edit or {})}
    config = {key: value for key, value in config.items() if key != drop_key}
    (dest / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return dest


def replace_weights(dest: Path, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """Swap the fixture's `.bin` shards in `dest` for `files` (name -> tensors; .bin or .safetensors)."""
    for path in [*dest.glob("pytorch_model*"), *dest.glob("model*.safetensors*")]:
        path.unlink()
    for name, tensors in files.items():
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / name))
        else:
            torch.save(tensors, dest / name)


def write_index(dest: Path, index_name: str, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """A `weight_map` index for `files`, as transformers writes it."""
    weight_map = {tensor: file for file, tensors in files.items() for tensor in tensors}
    total = sum(t.numel() * t.element_size() for tensors in files.values() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / index_name).write_text(json.dumps(index), encoding="utf-8")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_chatglm2(DATA, torch.float32, CPU)


@pytest.fixture(scope="module")
def greedy_runs(loaded: LoadedModel) -> dict[str, list[int]]:
    return greedy_runs_for(loaded, CASES)


TestGolden = golden_checks(CASES)


# ---------------------------------------------------------------- golden equality


def test_loaded_model_is_plain_native_glm(loaded: LoadedModel) -> None:
    model = loaded.model
    assert type(model) is GlmForCausalLM and not model.training
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    assert model.config.num_key_value_heads == 2 and model.config.head_dim == 16
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert loaded.name == "ChatGLM2 (chatglm2-tiny)" and loaded.context_length == 256
    assert is_chatglm2_dir(DATA) and not is_chatglm2_dir(DATA.parent)


def test_special_ids_and_prefix(loaded: LoadedModel) -> None:
    tokenizer = loaded.tokenizer
    special = EXPECTED["special_ids"]
    assert tokenizer.special_ids == {k: special[k] for k in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")}
    assert (tokenizer.eos_id, tokenizer.pad_id) == (special["eos"], special["pad"])
    assert tokenizer.eos_token_ids == frozenset({2})
    assert list(tokenizer.prefix_ids) == EXPECTED["prefix_ids"]












def test_one_case_ends_on_eos() -> None:
    """The fixture exercises stopping on eos (otherwise the greedy loop's stop is untested)."""
    assert any(case["greedy_ids"][-1] == 2 and len(case["greedy_ids"]) < MAX_NEW_TOKENS for case in CASES)


@pytest.mark.parametrize("stored", [torch.float32, torch.float16], ids=["float32 file", "float16 file"])
@pytest.mark.parametrize("mode", [Quantization.INT4, Quantization.INT8])
def test_quantizing_while_loading_equals_quantizing_after(mode: Quantization, stored: torch.dtype,
                                                          tmp_path: Path) -> None:
    """`--quantize` on a dense checkpoint quantizes each linear as it is read (never holding the dense model;
    int4 straight from the file's own floats): the same layers, bit for bit, as loading it dense in float32 and
    quantizing afterwards."""
    path = DATA
    if stored != torch.float32:  # as THUDM ships it: float16
        path = copy_fixture(tmp_path / "ckpt")
        layout_single_bin(path, {name: t.to(stored) for name, t in read_fixture_state().items()})
    after = load_chatglm2(path, torch.float32, torch.device("cpu")).model
    quantize_model(after, mode)
    during = load_chatglm2(path, torch.float32, torch.device("cpu"), mode).model
    quantize_model(during, mode)  # what the loader does next: the LM head
    kinds = {type(m).__name__ for m in during.modules()}
    assert not kinds & {"PendingLinear", "Linear"}
    assert [type(m) for m in during.modules()] == [type(m) for m in after.modules()]
    for (name, mine), (_, theirs) in zip(during.state_dict().items(), after.state_dict().items(), strict=True):
        assert torch.equal(mine, theirs), name
    ids = torch.tensor([CASES[0]["input_ids"]])
    torch.testing.assert_close(last_logits(during, ids[0].tolist()), last_logits(after, ids[0].tolist()),
                               rtol=0, atol=0)


def test_bfloat16_load_is_close(tmp_path: Path) -> None:
    loaded = load_chatglm2(DATA, torch.bfloat16, CPU)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32
    case = CASES[0]
    assert logits_error(loaded.model, case) < 0.25  # bf16 rounding; see README tolerances
    assert int(last_logits(loaded.model, case["input_ids"]).argmax()) == case["greedy_ids"][0]


# ---------------------------------------------------------------- the check bites


def swap_gate_up(model: GlmForCausalLM) -> None:
    """As if dense_h_to_4h were read up-then-gate."""
    for layer in model.model.layers:
        weight = layer.mlp.gate_up_proj.weight
        weight.copy_(torch.cat(weight.chunk(2, dim=0)[::-1]))


def swap_k_v(model: GlmForCausalLM) -> None:
    """As if query_key_value were split q, v, k."""
    for layer in model.model.layers:
        attn = layer.self_attn
        for kind in ("weight", "bias"):
            k, v = getattr(attn.k_proj, kind), getattr(attn.v_proj, kind)
            k_old = k.clone()
            k.copy_(v)
            v.copy_(k_old)


def unpair_rotary(model: GlmForCausalLM) -> None:
    """As if a Llama-style q/k row permutation (interleaved -> rotate-half) had been applied."""
    head_dim = model.config.head_dim
    rotary = head_dim // 2
    order = torch.cat(
        [torch.arange(0, rotary, 2), torch.arange(1, rotary, 2), torch.arange(rotary, head_dim)]
    )
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            for tensor in (proj.weight, proj.bias):
                heads = tensor.view(-1, head_dim, *tensor.shape[1:])  # [heads, head_dim, hidden?]
                heads.copy_(heads[:, order].clone())


@pytest.mark.parametrize("mutate", [swap_gate_up, swap_k_v, unpair_rotary], ids=lambda f: f.__name__)
def test_wrong_mapping_fails_logits_check(mutate: Callable[[GlmForCausalLM], None]) -> None:
    model = load_chatglm2(DATA, torch.float32, CPU).model
    with torch.no_grad():
        mutate(model)
    assert all(logits_error(model, case) > 100 * LOGITS_TOLERANCE for case in CASES)


# ---------------------------------------------------------------- other layouts of the same weights


def as_separate_heads(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fixture rewritten as `multi_query_attention: false`: kv groups repeated per head, rows per head
    interleaved [q_h; k_h; v_h], as ChatGLM2 lays them out without multi-query attention."""
    heads, groups, d = (
        FIXTURE_CONFIG[k] for k in ("num_attention_heads", "multi_query_group_num", "kv_channels")
    )
    out = dict(state)
    for name, fused in state.items():
        if "query_key_value" not in name:
            continue
        q, k, v = fused.split([heads * d, groups * d, groups * d])
        rest = fused.shape[1:]
        k, v = (t.view(groups, d, *rest).repeat_interleave(heads // groups, dim=0) for t in (k, v))
        out[name] = torch.stack([q.view(heads, d, *rest), k, v], dim=1).reshape(3 * heads * d, *rest)
    return out


def layout_single_bin(dest: Path, state: dict[str, torch.Tensor]) -> None:
    replace_weights(dest, {"pytorch_model.bin": state})


def layout_single_safetensors(dest: Path, state: dict[str, torch.Tensor]) -> None:
    replace_weights(dest, {"model.safetensors": state})


def layout_sharded_safetensors(dest: Path, state: dict[str, torch.Tensor]) -> None:
    names = sorted(state)
    files = {f"model-0000{i + 1}-of-00002.safetensors": {n: state[n] for n in names[i::2]} for i in range(2)}
    replace_weights(dest, files)
    write_index(dest, "model.safetensors.index.json", files)


@pytest.mark.parametrize(
    "layout",
    [layout_single_bin, layout_single_safetensors, layout_sharded_safetensors],
    ids=lambda f: f.__name__,
)
def test_other_file_layouts_match(
    tmp_path: Path, layout: Callable[[Path, dict[str, torch.Tensor]], None]
) -> None:
    dest = copy_fixture(tmp_path / "ckpt")
    layout(dest, read_fixture_state())
    model = load_chatglm2(dest, torch.float32, CPU).model
    assert max(logits_error(model, case) for case in CASES[:3]) < LOGITS_TOLERANCE


def test_non_multi_query_layout_matches(tmp_path: Path) -> None:
    dest = copy_fixture(tmp_path / "ckpt", {"multi_query_attention": False, "multi_query_group_num": 1})
    layout_single_bin(dest, as_separate_heads(read_fixture_state()))
    model = load_chatglm2(dest, torch.float32, CPU).model
    assert model.config.num_key_value_heads == FIXTURE_CONFIG["num_attention_heads"]
    assert max(logits_error(model, case) for case in CASES[:3]) < LOGITS_TOLERANCE


def test_checkpoint_code_is_never_run(tmp_path: Path) -> None:
    dest = copy_fixture(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    for module in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py"):
        (dest / module).write_text(f"open({str(marker)!r}, 'w').close()\n", encoding="utf-8")
    load_chatglm2(dest, torch.float32, CPU)
    assert not marker.exists()


# ---------------------------------------------------------------- unsupported variants


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quantization_bit", 8),
        ("quantization_bit", 2),
        ("quantization_bit", 4),  # these weights are float: refused naming the int8 they should be
        ("pre_seq_len", 128),
        ("rmsnorm", False),
        ("post_layer_norm", False),
        ("apply_residual_connection_post_layernorm", True),
        ("add_bias_linear", True),
        ("original_rope", False),
        ("fp32_residual_connection", True),
        ("rope_ratio", 0),
        ("rope_ratio", -16),
        ("rope_ratio", "16"),
        ("multi_query_group_num", 3),
        ("_name_or_path", "THUDM/chatglm3-6b"),
    ],
)
def test_unsupported_config_raises_naming_field(tmp_path: Path, field: str, value: Any) -> None:
    dest = copy_fixture(tmp_path / "ckpt", {field: value})
    with pytest.raises(ValueError, match=field):
        load_chatglm2(dest, torch.float32, CPU)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"num_layers": 3}, "lacks tensors"),
        ({"num_layers": 1}, "does not account for"),
        ({"ffn_hidden_size": 96}, "gate_up_proj"),
        ({"kv_channels": 8}, "query_key_value"),
        ({"padded_vocab_size": 1000}, "padded_vocab_size"),
    ],
)
def test_config_that_contradicts_weights_raises(tmp_path: Path, edit: dict[str, Any], message: str) -> None:
    dest = copy_fixture(tmp_path / "ckpt", edit)
    with pytest.raises(ValueError, match=message):
        load_chatglm2(dest, torch.float32, CPU)


def test_missing_config_field_raises(tmp_path: Path) -> None:
    dest = copy_fixture(tmp_path / "ckpt", drop_key="seq_length")
    with pytest.raises(ValueError, match="seq_length"):
        load_chatglm2(dest, torch.float32, CPU)


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("tokenizer.model", "tokenizer.model"),
        ("pytorch_model-00002-of-00003.bin", "pytorch_model-00002-of-00003.bin"),
        ("pytorch_model.bin.index.json", "no shard index"),
        ("config.json", "not a ChatGLM2 checkpoint"),
    ],
)
def test_missing_file_raises(tmp_path: Path, remove: str, message: str) -> None:
    dest = copy_fixture(tmp_path / "ckpt")
    (dest / remove).unlink()
    with pytest.raises(ValueError, match=message):
        load_chatglm2(dest, torch.float32, CPU)


def test_prefix_encoder_tensor_is_refused(tmp_path: Path) -> None:
    dest = copy_fixture(tmp_path / "ckpt")
    state = {**read_fixture_state(), "transformer.prefix_encoder.embedding.weight": torch.zeros(4, 64)}
    layout_single_bin(dest, state)
    with pytest.raises(ValueError, match="prefix_encoder"):
        load_chatglm2(dest, torch.float32, CPU)


def test_integer_weights_are_refused(tmp_path: Path) -> None:
    dest = copy_fixture(tmp_path / "ckpt")
    state = read_fixture_state()
    name = "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"
    layout_single_bin(dest, {**state, name: state[name].to(torch.int8)})
    with pytest.raises(ValueError, match="int8"):
        load_chatglm2(dest, torch.float32, CPU)


def test_non_sentencepiece_tokenizer_is_refused(tmp_path: Path) -> None:
    dest = copy_fixture(tmp_path / "ckpt")
    (dest / "tokenizer.model").write_text("IQ== 0\nIg== 1\n", encoding="utf-8")  # tiktoken-style, as GLM-4
    with pytest.raises(ValueError, match="sentencepiece"):
        load_chatglm2(dest, torch.float32, CPU)


class Payload:
    """Unpickling this would run `exec`; weights_only loading must refuse it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, ("raise SystemExit('pickled code ran')",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    dest = copy_fixture(tmp_path / "ckpt")
    layout_single_bin(dest, {**read_fixture_state(), "payload": Payload()})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="weights-only"):
        load_chatglm2(dest, torch.float32, CPU)


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> ChatGLM2Tokenizer:
    return ChatGLM2Tokenizer(DATA / "tokenizer.model")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_golden_texts_from_golden_ids(tokenizer: ChatGLM2Tokenizer, case: dict[str, Any]) -> None:
    """decode/finalize/stream semantics alone, independent of the model."""
    assert tokenizer.finalize(tokenizer.decode(case["greedy_ids"])) == case["chat_response"]
    assert stream_texts(tokenizer, case["greedy_ids"]) == case["stream_responses"]


def test_system_prompt_is_refused(tokenizer: ChatGLM2Tokenizer) -> None:
    with pytest.raises(ValueError, match="system"):
        tokenizer.encode_chat("hi", [], "be brief")
    assert tokenizer.encode_chat("hi", [], "") == tokenizer.encode_chat("hi", [], None)


def test_decode_drops_controls_specials_and_padding(tokenizer: ChatGLM2Tokenizer) -> None:
    text_ids = tokenizer.encode_text("hello")
    noise = [0, 1, 2, *tokenizer.special_ids.values(), 1005, 1023, 65000]
    assert tokenizer.decode([*noise[:4], *text_ids, *noise[4:]]) == tokenizer.decode(text_ids) == "hello"


def test_finalize_rewrites_training_time(tokenizer: ChatGLM2Tokenizer) -> None:
    assert tokenizer.rewrite_keys == ("[[训练时间]]",)
    assert tokenizer.finalize("  我的数据截止到[[训练时间]]。\n") == "我的数据截止到2023年。"
