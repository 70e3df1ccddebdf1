"""chatglm2-6b-32k against its golden fixture (tests/data/chatglm2-32k-tiny, made by the original code).

Loaded the way `--model DIR` loads it (`load_model`). The only difference from chatglm2-6b is the rotary:
positions divided by `rope_ratio`, base kept at 10000. The base-scaled rotary that vLLM and llama.cpp use,
and an ignored `rope_ratio`, both fail the logits check.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GlmForCausalLM
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

from service.config import SamplingDefaults
from service.models.base import LoadedModel
from service.models.chatglm2 import LONG_CONTEXT_MAX_LENGTH, load_chatglm2
from service.models.loader import load_model
from tests.models.chatglm2_golden import (
    DATA_ROOT,
    LOGITS_TOLERANCE,
    golden_checks,
    greedy_runs_for,
    logits_error,
    read_cases,
)

DATA = DATA_ROOT / "chatglm2-32k-tiny"
CASES = read_cases(DATA)
CASE_IDS = [case["name"] for case in CASES]
CPU = torch.device("cpu")
RATIO = 16


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(str(DATA), CPU, torch.float32)


@pytest.fixture(scope="module")
def greedy_runs(loaded: LoadedModel) -> dict[str, list[int]]:
    return greedy_runs_for(loaded, CASES)


TestGolden = golden_checks(CASES)


def test_config_is_linear_position_scaling(loaded: LoadedModel) -> None:
    config = loaded.model.config
    assert type(loaded.model) is GlmForCausalLM
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == RATIO
    assert config.rope_parameters["rope_theta"] == 10000.0
    base = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    assert torch.equal(loaded.model.model.rotary_emb.inv_freq, base / RATIO)


def test_context_and_default_max_length(loaded: LoadedModel) -> None:
    assert loaded.context_length == 256  # the fixture's seq_length (the real checkpoint: 32768)
    assert loaded.default_max_length == 256  # the original's 32768, cut to the context
    assert LONG_CONTEXT_MAX_LENGTH == 32768
    assert load_chatglm2(DATA_ROOT / "chatglm2-tiny", torch.float32, CPU).default_max_length is None










def test_long_positions_use_the_scaled_table(loaded: LoadedModel) -> None:
    """Past the fixture's prompts: cos/sin at position p are those of p / rope_ratio at base 10000."""
    positions = torch.tensor([[0, 17, 255, 4000]])
    cos, sin = loaded.model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    theta = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    angles = (positions[0, :, None].float() / RATIO) * theta  # [4, 4]
    assert torch.allclose(cos[0, :, :4], angles.cos(), atol=1e-6)
    assert torch.allclose(sin[0, :, :4], angles.sin(), atol=1e-6)


# ---------------------------------------------------------------- the check bites


def with_rotary(model: GlmForCausalLM, **rope: Any) -> GlmForCausalLM:
    """`model` with its rotary table rebuilt from other rope parameters."""
    config = model.config
    config.rope_parameters = {"partial_rotary_factor": 0.5, **rope}
    model.model.rotary_emb = GlmRotaryEmbedding(config)
    return model


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0 * RATIO},  # vLLM / llama.cpp: base * rope_ratio
        {"rope_type": "default", "rope_theta": 10000.0},  # rope_ratio ignored
    ],
    ids=["base_scaled", "ratio_ignored"],
)
def test_wrong_rotary_fails_logits_check(rope: dict[str, Any]) -> None:
    model = with_rotary(load_chatglm2(DATA, torch.float32, CPU).model, **rope)
    assert all(logits_error(model, case) > 100 * LOGITS_TOLERANCE for case in CASES)


def test_config_without_rope_ratio_fails_logits_check(tmp_path: Path) -> None:
    """The same weights read as a plain chatglm2-6b (no rope_ratio) do not reproduce the 32k outputs."""
    dest = tmp_path / "ckpt"
    shutil.copytree(DATA, dest)
    config = json.loads((DATA / "config.json").read_text(encoding="utf-8"))
    del config["rope_ratio"]
    (dest / "config.json").chmod(0o644)
    (dest / "config.json").write_text(json.dumps(config), encoding="utf-8")
    model = load_chatglm2(dest, torch.float32, CPU).model
    assert all(logits_error(model, case) > 100 * LOGITS_TOLERANCE for case in CASES)


def test_bfloat16_load_is_close() -> None:
    loaded = load_chatglm2(DATA, torch.bfloat16, CPU)
    assert loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32
    case = CASES[0]
    assert logits_error(loaded.model, case) < 0.25  # bf16 rounding, as for chatglm2-tiny


def test_checkpoint_max_length_applies_only_where_the_operator_set_none() -> None:
    assert SamplingDefaults().for_model(LONG_CONTEXT_MAX_LENGTH).max_length == LONG_CONTEXT_MAX_LENGTH
    assert SamplingDefaults(max_length=4096).for_model(LONG_CONTEXT_MAX_LENGTH).max_length == 4096
    assert SamplingDefaults().for_model(None) == SamplingDefaults()


def test_a_prompt_past_2048_positions_through_the_paged_engine_equals_the_plain_forward() -> None:
    """Past the old 2048-position slot (and the fixture's 256): a 2600-token prompt computed in 512-token
    chunks over the paged pool, then two decode steps, give the plain transformers forward's logits to 1e-4."""
    from service.engine.model_runner import ModelRunner
    from service.engine.solo import Solo

    model = load_model(str(DATA), CPU, torch.float32).model
    generator = torch.Generator().manual_seed(32)
    ids = torch.randint(3, 1000, (2600,), generator=generator).tolist()

    def plain(sequence: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([sequence])).logits[0, -1].float()

    expected = plain(ids)
    solo = Solo(ModelRunner(model, num_blocks=200, block_size=16, max_rows=2, max_context=3072))
    for start in range(0, len(ids), 512):
        logits = solo.prefill(ids[start:start + 512])
    assert (logits - expected).abs().max() <= LOGITS_TOLERANCE
    for _ in range(2):
        ids.append(int(logits.argmax()))
        logits = solo.decode(ids[-1])
        assert (logits - plain(ids)).abs().max() <= LOGITS_TOLERANCE
