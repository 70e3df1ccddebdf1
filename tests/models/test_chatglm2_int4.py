"""chatglm2-6b-int4 against its golden fixture (tests/data/chatglm2-int4-tiny, made by the original code with
its own CPU kernels).

Loaded the way `--model DIR` loads it (`load_model`): the packed int8 weights go straight into `Int4Linear`
modules (torch's int4 CPU kernel). Reading the nibbles low-first, or ignoring `weight_scale`, fails the
logits check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GlmForCausalLM

from service.models import chatglm2_int4
from service.models.base import LoadedModel
from service.models.chatglm2 import load_chatglm2, release_pages
from service.models.loader import load_model
from service.models.quant.int4 import Int4Linear
from tests.models.chatglm2_golden import (
    DATA_ROOT,
    LOGITS_TOLERANCE,
    golden_checks,
    greedy_runs_for,
    logits_error,
    read_cases,
)

DATA = DATA_ROOT / "chatglm2-int4-tiny"
CASES = read_cases(DATA)
CASE_IDS = [case["name"] for case in CASES]
CPU = torch.device("cpu")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_up_proj", "mlp.down_proj")
QKV = "transformer.encoder.layers.0.self_attention.query_key_value"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    # an empty weight cache: the nibbles are repacked here, not read back from an earlier run's entry
    return load_model(str(DATA), CPU, torch.float32, cache=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def greedy_runs(loaded: LoadedModel) -> dict[str, list[int]]:
    return greedy_runs_for(loaded, CASES)


TestGolden = golden_checks(CASES)


def read_state() -> dict[str, torch.Tensor]:
    return torch.load(DATA / "pytorch_model.bin", map_location="cpu", weights_only=True)


def copy_with_state(dest: Path, state: dict[str, torch.Tensor], config_edit: dict[str, Any] | None = None) -> Path:
    """The fixture in `dest` with its weights replaced by `state` and its config edited."""
    shutil.copytree(DATA, dest, ignore=shutil.ignore_patterns("pytorch_model.bin", "expected.json"))
    config = {**json.loads((DATA / "config.json").read_text(encoding="utf-8")), **(config_edit or {})}
    (dest / "config.json").chmod(0o644)
    (dest / "config.json").write_text(json.dumps(config), encoding="utf-8")
    torch.save(state, dest / "pytorch_model.bin")
    return dest


# ---------------------------------------------------------------- structure


def test_quantized_linears_are_int4_and_the_rest_float(loaded: LoadedModel) -> None:
    model = loaded.model
    assert type(model) is GlmForCausalLM and loaded.context_length == 256
    assert loaded.default_max_length is None  # api.py's 2048 applies, as for chatglm2-6b
    for layer in model.model.layers:
        for name in LINEARS:
            module = layer.get_submodule(name)
            assert type(module) is Int4Linear and module.packed.dtype == torch.uint8
            assert module.packed.numel() * 2 == module.in_features * module.out_features
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    assert type(model.lm_head) is nn.Linear and model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.model.layers[0].self_attn.o_proj.bias is None


def test_unpack_reads_the_high_nibble_first() -> None:
    packed = torch.tensor([[0x7F, -0x80, 0x18]], dtype=torch.int8).view(torch.int8)  # bytes 7F 80 18
    signed = chatglm2_int4.unpack_int4(packed).int() - 8
    assert signed.tolist() == [[7, -1, -8, 0, 1, -8]]


# ---------------------------------------------------------------- golden equality










def test_dense_fallback_matches() -> None:
    """Where the int4 kernel cannot run (here float64, which it lacks), the weights are dequantized at load."""
    model = load_chatglm2(DATA, torch.float64, CPU).model
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float64
    assert max(logits_error(model, case) for case in CASES) < LOGITS_TOLERANCE


def test_bfloat16_load_is_close() -> None:
    model = load_chatglm2(DATA, torch.bfloat16, CPU).model
    assert model.model.layers[0].mlp.down_proj.scales.dtype == torch.bfloat16
    case = CASES[0]
    assert logits_error(model, case) < 0.5  # bf16 activations and scales
    logits = model(input_ids=torch.tensor([case["input_ids"]])).logits[0, -1]
    assert int(logits.argmax()) == case["greedy_ids"][0]


# ---------------------------------------------------------------- the check bites


def low_nibble_first(packed: torch.Tensor) -> torch.Tensor:
    raw = packed.view(torch.uint8)
    return torch.stack([(raw & 0x0F) ^ 8, (raw >> 4) ^ 8], dim=-1).view(packed.shape[0], -1)


def test_low_nibble_first_fails_logits_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chatglm2_int4, "unpack_int4", low_nibble_first)
    model = load_chatglm2(DATA, torch.float32, CPU).model
    assert all(logits_error(model, case) > 100 * LOGITS_TOLERANCE for case in CASES)


def test_ignored_weight_scale_fails_logits_check(tmp_path: Path) -> None:
    state = {name: torch.ones_like(t) if name.endswith("weight_scale") else t for name, t in read_state().items()}
    model = load_chatglm2(copy_with_state(tmp_path / "ckpt", state), torch.float32, CPU).model
    assert all(logits_error(model, case) > 100 * LOGITS_TOLERANCE for case in CASES)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"quantization_bit": 8}, "quantization_bit=8"),
        ({"quantization_bit": 0}, "lacks tensors|not account|int8"),
        ({"_name_or_path": "THUDM/chatglm3-6b-32k"}, "_name_or_path"),
        ({"_name_or_path": "THUDM/glm-4-9b-chat"}, "_name_or_path"),
    ],
)
def test_other_variants_are_refused(tmp_path: Path, edit: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_chatglm2(copy_with_state(tmp_path / "ckpt", read_state(), edit), torch.float32, CPU)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop(f"{QKV}.weight_scale"), "lacks the weight or weight_scale"),
        (lambda s: s.pop(f"{QKV}.bias"), "lacks the weight or weight_scale"),
        (lambda s: s.__setitem__(f"{QKV}.weight", s[f"{QKV}.weight"].float()), "wants int8"),
        (lambda s: s.__setitem__(f"{QKV}.weight", s[f"{QKV}.weight"][:, :16].contiguous()), "packed shape"),
        (lambda s: s.__setitem__(f"{QKV}.weight_scale", s[f"{QKV}.weight_scale"][:64]), "weight_scale"),
        (lambda s: s.__setitem__("transformer.encoder.layers.0.input_layernorm.weight_scale", torch.ones(64)),
         "unexpected tensor"),
    ],
    ids=["no_scale", "no_bias", "float_weight", "short_rows", "short_scale", "stray_scale"],
)
def test_broken_int4_tensors_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    state = read_state()
    change(state)
    with pytest.raises(ValueError, match=message):
        load_chatglm2(copy_with_state(tmp_path / "ckpt", state), torch.float32, CPU)


def test_released_pages_read_back_from_the_file() -> None:
    """After release_pages a memory-mapped tensor still reads its bytes (they come back from the file)."""
    state = torch.load(DATA / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True)
    name = "transformer.output_layer.weight"  # 128 KiB: spans whole pages
    before = state[name].clone()
    release_pages(state[name])
    assert torch.equal(state[name], before)
