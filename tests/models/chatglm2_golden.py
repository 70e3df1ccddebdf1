"""Helpers shared by the golden ChatGLM2 tests: run a model the way the original's expected.json was made.

Each fixture in tests/data/chatglm2-*-tiny holds a tiny random checkpoint in the original layout and an
`expected.json` written by THUDM's original implementation (see each fixture's README.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

from service.models.base import Turn
from service.models.chatglm2_tokenizer import ChatGLM2Tokenizer

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"
LOGITS_TOLERANCE = 1e-4  # float32; the fixtures' READMEs
MAX_NEW_TOKENS = 16  # what the original's chat() was run with


def read_cases(fixture: Path) -> list[dict[str, Any]]:
    """The `cases` of a fixture's expected.json."""
    return json.loads((fixture / "expected.json").read_text(encoding="utf-8"))["cases"]


def history_of(case: dict[str, Any]) -> list[Turn]:
    """The case's `[[q, a], ...]` history as turns."""
    return [Turn(user=q, assistant=a) for q, a in case["history"]]


@torch.inference_mode()
def last_logits(model: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """Float32 logits [vocab] at the last prompt position of one full forward pass."""
    return model(input_ids=torch.tensor([list(ids)])).logits[0, -1].float()


def logits_error(model: torch.nn.Module, case: dict[str, Any]) -> float:
    """Max abs difference between the model's last logits and the golden ones."""
    return (last_logits(model, case["input_ids"]) - torch.tensor(case["last_logits"])).abs().max().item()


@torch.inference_mode()
def greedy(model: torch.nn.Module, ids: Sequence[int], eos: frozenset[int], max_new: int) -> list[int]:
    """Greedy ids after `ids`, calling the model as the engine does (DynamicCache, explicit positions)."""
    cache = DynamicCache(config=model.config)
    step = torch.tensor([list(ids)])  # [1, prompt]
    mask = torch.ones_like(step)  # [1, seen]
    new: list[int] = []
    while len(new) < max_new and (not new or new[-1] not in eos):
        start = mask.shape[1] - step.shape[1]
        positions = torch.arange(start, mask.shape[1])[None]  # [1, step]
        logits = model(
            input_ids=step, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        ).logits  # [1, step, vocab]
        new.append(int(logits[0, -1].argmax()))
        step = torch.tensor([[new[-1]]])
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    return new


def stream_texts(tokenizer: ChatGLM2Tokenizer, ids: Sequence[int]) -> list[str]:
    """What `stream_chat` yields: after each id, the finalized text so far, if its raw decode is
    non-empty and does not end in U+FFFD."""
    raws = (tokenizer.decode(ids[: n + 1]) for n in range(len(ids)))
    return [tokenizer.finalize(raw) for raw in raws if raw and not raw.endswith("\ufffd")]


def greedy_runs_for(loaded, cases: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Each case's greedy ids, by case name (what a module's `greedy_runs` fixture returns)."""
    eos = loaded.tokenizer.eos_token_ids
    return {case["name"]: greedy(loaded.model, case["input_ids"], eos, MAX_NEW_TOKENS) for case in cases}


def golden_checks(cases: list[dict[str, Any]]) -> type:
    """The checks every fixture's cases pass, as a test class (`TestGolden = golden_checks(CASES)`); the module
    provides the `loaded` (a LoadedModel) and `greedy_runs` fixtures."""
    ids = [case["name"] for case in cases]
    each_case = pytest.mark.parametrize("case", cases, ids=ids)

    class GoldenChecks:
        @each_case
        def test_input_ids(self, loaded, case):
            assert loaded.tokenizer.encode_chat(case["query"], history_of(case), None) == case["input_ids"]

        @each_case
        def test_last_logits(self, loaded, case):
            assert logits_error(loaded.model, case) < LOGITS_TOLERANCE

        @each_case
        def test_greedy_ids(self, greedy_runs, case):
            assert greedy_runs[case["name"]] == case["greedy_ids"]

        @each_case
        def test_chat_and_stream_texts(self, loaded, greedy_runs, case):
            tokenizer, new_ids = loaded.tokenizer, greedy_runs[case["name"]]
            assert tokenizer.finalize(tokenizer.decode(new_ids)) == case["chat_response"]
            assert stream_texts(tokenizer, new_ids) == case["stream_responses"]

    return GoldenChecks
