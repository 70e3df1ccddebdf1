"""Choosing each row's next token with its own sampling parameters, batched over the step's rows.

The order is vLLM's: log-probabilities from the raw float32 logits first; then logit_bias, the min_new_tokens
mask of the ends, the penalties (repetition over prompt and answer, presence and frequency over the answer, read
from per-row token counts kept on the device) and the constraint masks; then greedy rows take the argmax and the
others go through temperature, min-p, top-k and top-p to a draw, seeded rows each from their own generator.
Every step is one tensor operation over the rows that need it; the only per-row calls are the seeded draws
(a generator is one row's) and the constraint matchers (in Masks). Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from service.engine.request import SamplingParams, TokenLogprob
from service.engine.staging import to_device


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private random stream for a seeded request, so its answer doesn't depend on its neighbours."""
    if params.seed is None or params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


@dataclass
class Row:
    """What sampling needs of one sequence this step."""

    params: SamplingParams
    generator: torch.Generator | None = None
    generated: int = 0  # tokens the answer has so far
    slot: int | None = None  # its row in TokenCounts (penalized rows only)
    matcher: Any = None  # its constraint's matcher (service/engine/constraint.py), if any


class TokenCounts:
    """Token counts of the penalized sequences, on the device: how often each id is in the answer [S, V] (floats,
    exact for any count an answer reaches), whether it is in the prompt [S, V], and each slot's OpenAI penalty
    frequency * count + presence * (count > 0) [S, V]. A sequence holds a slot from its first penalized step until
    it leaves; each step updates the sampled ids' counts and penalties in one scatter, so no row's history is
    copied or rescanned, and penalizing is one subtraction."""

    def __init__(self, vocab_size: int, device: torch.device, slots: int = 8):
        self.vocab_size, self.device = vocab_size, device
        self.output = torch.zeros(slots, vocab_size, device=device)  # [S, V]
        self.prompt = torch.zeros(slots, vocab_size, dtype=torch.bool, device=device)  # [S, V]
        self.penalty = torch.zeros(slots, vocab_size, device=device)  # [S, V]
        self.presence = torch.zeros(slots, device=device)  # [S]
        self.frequency = torch.zeros(slots, device=device)  # [S]
        self._free = list(range(slots))

    def assign(self, prompt_ids: Sequence[int], generated: Sequence[int], presence: float = 0.0,
               frequency: float = 0.0) -> int:
        """A slot holding these counts (a resumed or forked sequence brings what it generated)."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.output[slot].zero_()
        self.prompt[slot].zero_()
        self.prompt[slot, torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)] = True
        if generated:
            ids = torch.tensor(list(generated), dtype=torch.long, device=self.device)
            self.output[slot].index_add_(0, ids, torch.ones(len(ids), device=self.device))
        self.presence[slot], self.frequency[slot] = presence, frequency
        self.penalty[slot] = frequency * self.output[slot] + presence * (self.output[slot] > 0)
        return slot

    def _grow(self) -> None:
        size = self.output.shape[0]
        for name in ("output", "prompt", "penalty", "presence", "frequency"):
            setattr(self, name, torch.cat([getattr(self, name), torch.zeros_like(getattr(self, name))]))
        self._free = list(range(2 * size - 1, size - 1, -1))

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def add(self, slots: list[int], tokens: list[int]) -> None:
        """Count each slot's sampled token (one token per slot) and update its penalty."""
        index = to_device(slots, self.device), to_device(tokens, self.device)
        self.output.index_put_(index, torch.ones(len(slots), device=self.device), accumulate=True)
        self.penalty[index] = self.frequency[index[0]] * self.output[index] + self.presence[index[0]]


def _column(rows: Sequence[Row], pick, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    return to_device([pick(r.params) for r in rows], device, dtype)[:, None]  # [B', 1]


def add_logit_bias(logits: torch.Tensor, rows: Sequence[Row]) -> None:
    """logits [B, V] += each row's logit_bias, in one scatter."""
    at = [(b, token, bias) for b, r in enumerate(rows) for token, bias in r.params.logit_bias]
    if at:
        row, token, bias = zip(*at, strict=True)
        index = to_device(row, logits.device), to_device(token, logits.device)
        logits.index_put_(index, to_device(bias, logits.device, logits.dtype), accumulate=True)


def mask_early_ends(logits: torch.Tensor, rows: Sequence[Row], eos_ids: frozenset[int]) -> None:
    """-inf on the ends (EOS unless ignore_eos, and stop_token_ids) of rows short of their min_new_tokens."""
    at = [(b, token) for b, r in enumerate(rows) if r.generated < r.params.min_new_tokens
          for token in (() if r.params.ignore_eos else tuple(eos_ids)) + r.params.stop_token_ids]
    if at:
        row, token = zip(*at, strict=True)
        logits[to_device(row, logits.device), to_device(token, logits.device)] = float("-inf")


def penalize(logits: torch.Tensor, rows: Sequence[Row], counts: TokenCounts) -> None:
    """The penalized rows of logits [B, V]: CTRL's repetition penalty over prompt and answer, then OpenAI's
    presence and frequency penalties over the answer (logit -= frequency * count + presence * (count > 0)),
    kept ready in `counts.penalty`."""
    device = logits.device
    repeated = [b for b, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if repeated:
        slots = to_device([rows[b].slot for b in repeated], device)
        index = to_device(repeated, device)
        seen = (counts.output[slots] > 0) | counts.prompt[slots]  # [R, V]
        scores = logits[index]
        repetition = _column([rows[b] for b in repeated], lambda p: p.repetition_penalty, device)
        logits[index] = torch.where(seen, torch.where(scores < 0, scores * repetition, scores / repetition), scores)
    picked = [b for b, r in enumerate(rows) if r.params.presence_penalty or r.params.frequency_penalty]
    if not picked:
        return
    penalties = counts.penalty.index_select(0, to_device([rows[b].slot for b in picked], device))
    if len(picked) == len(rows):
        logits.sub_(penalties)
    else:
        logits.index_add_(0, to_device(picked, device), penalties, alpha=-1)


# Top-p and top-k look for their cut among each row's best tokens first (one top-k of the first of these widths
# that holds every row's nucleus), and sort the whole vocabulary only when none does (a flat distribution), or
# when a row that cuts nothing (top_p 1, no top_k) shares the step with rows that cut: a
# full sort of every row's vocabulary costs more than the rest of sampling together, on a GPU and on a CPU.
# Unseeded rows then draw among these candidates only, as a draw over the whole vocabulary costs about as much as
# the sort on a CPU. SmolLM2's nucleus at temperature 0.95 and top_p 0.7 was 2 tokens at the median and 58 at
# most, over 200 steps of 5 prompts.
NUCLEUS_CANDIDATES = (128, 1024)


@dataclass
class Filtered:
    """Sampled rows' logits after temperature, min-p, top-k and top-p, with what they cut at -inf [B', V]; and,
    where they were found among a shortlist, its ids [B', W] (each row's best W, which hold every token it kept),
    else None."""

    logits: torch.Tensor
    candidates: torch.Tensor | None = None


def filter_logits(logits: torch.Tensor, rows: Sequence[Row]) -> Filtered:
    """Sampled rows' logits [B', V] divided by temperature, with what min-p, top-k and top-p leave out at -inf
    (top-p keeps the token that crosses it)."""
    device, vocab = logits.device, logits.shape[-1]
    logits = logits / _column(rows, lambda p: p.temperature, device)
    if any(r.params.min_p > 0 for r in rows):
        probs = logits.softmax(-1)
        floor = _column(rows, lambda p: p.min_p, device) * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in rows]
    top_p = [r.params.top_p for r in rows]
    if all(k == vocab and p >= 1.0 for k, p in zip(top_k, top_p, strict=True)):
        return Filtered(logits)  # nothing to cut: no sort at all
    if all(k < vocab or p < 1.0 for k, p in zip(top_k, top_p, strict=True)):  # no row keeps everything
        for candidates in NUCLEUS_CANDIDATES:
            width = max(k if k < vocab else candidates for k in top_k)
            if width >= vocab:
                break
            kept = cut(logits, top_k, top_p, width)
            if kept is not None:
                return kept
    return cut(logits, top_k, top_p, vocab)


def cut(logits: torch.Tensor, top_k: list[int], top_p: list[float], width: int) -> Filtered | None:
    """logits [B', V] with all but each row's top-k and then its top-p nucleus at -inf, found among the `width`
    best tokens of each row (a top_k of V: none); None if a row without top_k may have its nucleus reach past
    them (its `width` best hold less than top_p of its probability). At width V this sorts the whole vocabulary
    and is never None."""
    device, vocab = logits.device, logits.shape[-1]
    p = to_device(top_p, device, torch.float32)  # [B']
    k = to_device(top_k, device)  # [B']
    if width < vocab:
        ordered, order = logits.topk(width, dim=-1)  # [B', W], descending
    else:
        ordered, order = torch.sort(logits, dim=-1, descending=True)  # [B', V]
    drop = torch.arange(width, device=device)[None, :] >= k[:, None]  # beyond top-k
    ordered = ordered.masked_fill(drop, float("-inf"))
    if width == vocab:
        probs = ordered.softmax(-1)
    else:  # each row's probabilities after top-k: over the whole vocabulary where it has no top_k
        whole = k == vocab
        norm = torch.where(whole, logits.logsumexp(-1), ordered.logsumexp(-1))  # [B']
        probs = (ordered - norm[:, None]).exp()
        if bool((whole & (probs.sum(-1) < p)).any()):  # the one read back of this path
            return None
    drop |= (probs.cumsum(-1) - probs >= p[:, None]) & (p < 1.0)[:, None]  # top_p 1: no cut, not even rounding's
    if width == vocab:
        return Filtered(logits.masked_fill(drop.scatter(-1, order, drop), float("-inf")))
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, ~drop)
    return Filtered(logits.masked_fill(~keep, float("-inf")), order)


def draw(filtered: Filtered, rows: Sequence[Row]) -> torch.Tensor:
    """One id per row -> [B'], on the device (nothing read back): unseeded rows in one draw (among their
    candidates where there are some: the same distribution), seeded ones from their generators, over the whole
    vocabulary as they always drew (a seed keeps giving the answer it gave)."""
    logits, candidates = filtered.logits, filtered.candidates
    chosen = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    shared = [b for b, r in enumerate(rows) if r.generator is None]
    if shared and candidates is not None:
        among = candidates[shared]  # [S, W]
        picks = torch.multinomial(logits[shared].gather(-1, among).softmax(-1), 1)  # [S, 1], of W
        chosen[shared] = among.gather(-1, picks)[:, 0]
    elif shared:
        chosen[shared] = torch.multinomial(logits[shared].softmax(-1), 1)[:, 0]
    seeded = [b for b, r in enumerate(rows) if r.generator is not None]
    if seeded:
        probs = logits.softmax(-1)  # [B', V], as seeded rows always drew: the same floats, the same draw
        for b in seeded:
            chosen[b] = torch.multinomial(probs[b], 1, generator=rows[b].generator)[0]
    return chosen


def report(logprobs: torch.Tensor, tokens: list[int], rows: Sequence[Row]) -> list[TokenLogprob]:
    """Each logprob row's chosen token with its log-probability and top alternatives, from logprobs [L, V]."""
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    k = max(r.params.top_logprobs for r in rows)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    values, ids = top_values.tolist(), top_ids.tolist()
    return [TokenLogprob(token, value, tuple(zip(ids[b][:r.params.top_logprobs], values[b][:r.params.top_logprobs],
                                                 strict=True)))
            for b, (r, token, value) in enumerate(zip(rows, tokens, chosen, strict=True))]


def needs_processing(rows: Sequence[Row]) -> bool:
    return any(r.params.logit_bias or r.params.min_new_tokens or r.params.penalized or r.matcher is not None
               for r in rows)


def sample(logits: torch.Tensor, rows: Sequence[Row], *, eos_ids: frozenset[int], counts: TokenCounts | None = None,
           masks=None) -> tuple[list[int], list[TokenLogprob | None]]:
    """Each row's next id from logits [B, V], and for rows that asked, its TokenLogprob (else None)."""
    wants = [b for b, r in enumerate(rows) if r.params.wants_logprobs]
    if not wants and not needs_processing(rows) and all(r.params.greedy for r in rows):
        return logits.argmax(-1).tolist(), [None] * len(rows)
    raw = logits
    logits = logits.float()
    logprobs = logits[wants].log_softmax(-1) if wants else None  # [L, V], before anything changes the logits
    if needs_processing(rows):
        if logits is raw:  # float() made no copy: the caller's logits stay as they were
            logits = logits.clone()
        add_logit_bias(logits, rows)
        mask_early_ends(logits, rows, eos_ids)
        if counts is not None:
            penalize(logits, rows, counts)
        if masks is not None and any(r.matcher is not None for r in rows):
            masks.apply(logits, [r.matcher for r in rows])
    picked = logits.argmax(-1)  # [B], on the device
    sampled = [b for b, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        subset = [rows[b] for b in sampled]
        picked[sampled] = draw(filter_logits(logits[sampled], subset), subset)
    chosen = picked.tolist()  # the step's one read back from the device
    infos: list[TokenLogprob | None] = [None] * len(rows)
    if wants:
        for b, info in zip(wants, report(logprobs, [chosen[b] for b in wants], [rows[b] for b in wants]),
                           strict=True):
            infos[b] = info
    return chosen, infos
