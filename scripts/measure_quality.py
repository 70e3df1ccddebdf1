"""Quality of every lossy weight mode against the dense float32 model: greedy agreement and perplexity.

For each mode (the GGUF file's packed int4 as served by default, `--quantize int8`, `--quantize int4`), on the
embedded SmolLM2-135M-Instruct in float32 activations:
- greedy agreement: the 8 benchmark prompts, 32 greedy tokens each; the share of tokens equal to the dense
  model's before the first difference, and how many answers are equal in full;
- perplexity on a fixed English text (this file's TEXT), next to the dense model's.

    python -m scripts.measure_quality        # prints a table, writes bench/results/quality.json
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from bench.prompts import PROMPTS
from service.models.loader import load_model
from service.models.quant.quantize import Quantization, quantize_model

ROOT = Path(__file__).resolve().parent.parent
NEW_TOKENS = 32
TEXT = (
    "The lighthouse stood at the edge of the cliff, its white tower weathered by a hundred years of storms. "
    "Every evening the keeper climbed the spiral stairs, trimmed the wick and wound the clockwork that turned "
    "the great lens. Ships passing in the night saw the beam sweep across the water and knew where the rocks "
    "lay. In winter the wind howled so loudly that he could not hear his own footsteps, and in summer the sea "
    "was so calm that the light seemed to float on a mirror. He kept a logbook of every vessel he saw, noting "
    "the weather, the time and the direction it was heading."
)
MODES = {"dense float32 (reference)": Quantization.NONE, "GGUF Q4_1 packed int4 + int8 head (default)":
         Quantization.AUTO, "--quantize int8": Quantization.INT8, "--quantize int4": Quantization.INT4}


@torch.inference_mode()
def greedy(model, ids: list[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    return out[0, len(ids):].tolist()


@torch.inference_mode()
def perplexity(model, ids: list[int]) -> float:
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item())


def load(mode: Quantization):
    """--quantize int8 / int4 on the GGUF file quantize its dequantized layers, as they would any model's."""
    dense = mode in (Quantization.INT8, Quantization.INT4)
    loaded = load_model("", torch.device("cpu"), torch.float32, Quantization.NONE if dense else mode)
    if dense:
        quantize_model(loaded.model, mode)
    return loaded


def main() -> None:
    rows, reference = [], None
    for label, mode in MODES.items():
        loaded = load(mode)
        prompts = [loaded.tokenizer.encode_chat(p, (), None) for p in PROMPTS]
        answers = [greedy(loaded.model, ids) for ids in prompts]
        text_ids = loaded.tokenizer.encode_text(TEXT)
        row = {"mode": label, "perplexity": round(perplexity(loaded.model, text_ids), 3)}
        if reference is None:
            reference = answers
        agreed = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), NEW_TOKENS)
                  for x, y in zip(answers, reference, strict=True)]
        row["greedy_agreement"] = round(sum(agreed) / (NEW_TOKENS * len(PROMPTS)), 3)
        row["answers_equal"] = f"{sum(a == NEW_TOKENS for a in agreed)}/{len(PROMPTS)}"
        rows.append(row)
        print(row, flush=True)
    out = ROOT / "bench" / "results" / "quality.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
