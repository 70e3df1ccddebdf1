"""scripts/make_random_chatglm2.py writes checkpoints the loader reads as the real ones: tiny sizes here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scripts.make_random_chatglm2 import Spec, quantize_row_int4, write_checkpoint
from service.models.chatglm2 import load_chatglm2
from service.models.chatglm2_int4 import unpack_int4
from service.models.quant.int4 import Int4Linear
from tests.models.chatglm2_golden import DATA_ROOT

TINY = Spec(layers=2, hidden=64, heads=4, head_dim=16, groups=2, ffn=128, vocab=1024, seq_length=256, shards=2)
TOKENIZER = DATA_ROOT / "chatglm2-tiny" / "tokenizer.model"
CPU = torch.device("cpu")


def test_row_quantization_follows_the_original_rule() -> None:
    weight = (torch.randn(32, 64) * 0.02).half()
    packed, scale = quantize_row_int4(weight)
    assert packed.dtype == torch.int8 and packed.shape == (32, 32) and scale.dtype == torch.float16
    signed = unpack_int4(packed).int() - 8
    assert int(signed.abs().max()) == 7 and torch.equal(signed, torch.round(weight / scale[:, None]).int())
    assert torch.equal(scale, weight.abs().max(dim=-1).values / 7)


@pytest.mark.parametrize("variant", ["6b", "32k", "int4"])
def test_variant_loads(tmp_path: Path, variant: str) -> None:
    write_checkpoint(tmp_path, TINY, TOKENIZER, seed=0, variant=variant)
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    loaded = load_chatglm2(tmp_path, torch.float32, CPU)
    model = loaded.model
    logits = model(input_ids=torch.tensor([loaded.tokenizer.encode_chat("hi", [], None)])).logits
    assert bool(torch.isfinite(logits).all())
    if variant == "int4":
        assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["pytorch_model.bin"]
        assert config["quantization_bit"] == 4 and "AutoModelForCausalLM" not in config["auto_map"]
        assert type(model.model.layers[1].mlp.down_proj) is Int4Linear
    else:
        assert (tmp_path / "pytorch_model.bin.index.json").is_file()
    assert config.get("rope_ratio") == (16 if variant == "32k" else None)
    assert loaded.default_max_length == (256 if variant == "32k" else None)
