"""Choosing each row's next token with its own sampling parameters. Shapes: B rows, V vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from service.types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private random stream for a seeded request, so its answer doesn't depend on its neighbours."""
    if params.seed is None or params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style repetition penalty on one row's logits [V] for the token ids in `seen` [N]."""
    scores = logits.gather(0, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits [V] with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One sampled token id from one row's logits [V]."""
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    seen: Sequence[torch.Tensor],
) -> list[int]:
    """Each row's next token from logits [B, V]: greedy rows at once, sampled rows one by one."""
    greedy = logits.argmax(-1).tolist()  # [B]
    chosen = []
    for row, p in enumerate(params):
        if p.repetition_penalty == 1.0 and p.greedy:
            chosen.append(greedy[row])
            continue
        row_logits = logits[row]
        if p.repetition_penalty != 1.0:
            row_logits = penalize_repeats(row_logits, seen[row], p.repetition_penalty)
        chosen.append(int(row_logits.argmax()) if p.greedy else sample_row(row_logits, p, generators[row]))
    return chosen
