"""Choosing each row's next token with its own sampling parameters. Shapes: B rows, V vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from service.engine.request import SamplingParams


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


def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams]) -> list[int]:
    """One sampled id per row of logits [R, V], every row with its own temperature / top-k / top-p, in one pass
    over the batch (rows without a seed share the default random stream)."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]  # [R, 1]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else logits.shape[-1] for p in params], device=device)  # [R]
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]  # [R, 1]
    ordered, order = torch.sort(logits / temperature, dim=-1, descending=True)  # [R, V]
    ranks = torch.arange(logits.shape[-1], device=device)[None, :]
    ordered = ordered.masked_fill(ranks >= top_k[:, None], float("-inf"))  # top-k
    probs = ordered.softmax(-1)
    ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))  # keep the crossing token
    picked = torch.multinomial(ordered.softmax(-1), 1)  # [R, 1], positions in the sorted order
    return order.gather(-1, picked)[:, 0].tolist()


def next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    seen: Sequence[torch.Tensor],
) -> list[int]:
    """Each row's next token from logits [B, V]: greedy rows and unseeded sampled rows each in one batched
    pass; rows with a repetition penalty or a seed (their own random stream) one by one."""
    chosen = logits.argmax(-1).tolist()  # [B]
    shared = [row for row, p in enumerate(params)
              if not p.greedy and p.repetition_penalty == 1.0 and generators[row] is None]
    if shared:
        for row, token in zip(shared, sample_batch(logits[shared], [params[r] for r in shared]), strict=True):
            chosen[row] = token
    batched = set(shared)
    for row, p in enumerate(params):
        if row in batched or (p.greedy and p.repetition_penalty == 1.0):
            continue
        row_logits = logits[row]
        if p.repetition_penalty != 1.0:
            row_logits = penalize_repeats(row_logits, seen[row], p.repetition_penalty)
        chosen[row] = int(row_logits.argmax()) if p.greedy else sample_row(row_logits, p, generators[row])
    return chosen
