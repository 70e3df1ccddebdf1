"""Per-row sampling over a batch (service/engine/sampling.py), on made-up logits: greedy, batched temperature /
top-k / top-p / min-p, seeded rows, the penalties from device token counts as OpenAI's formula says, logit_bias,
the min_new_tokens mask, and log-probabilities of the raw logits."""

from __future__ import annotations

import math

import torch

from service.engine import sampling
from service.engine.request import SamplingParams
from service.engine.sampling import Row, TokenCounts, cut, filter_logits, make_generator, sample

EOS = frozenset({3})


def params(**kw) -> SamplingParams:
    fields = dict(max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0) | kw
    return SamplingParams(**fields)


def picks(logits, rows, counts=None) -> list[int]:
    return sample(logits, rows, eos_ids=EOS, counts=counts)[0]


def test_each_row_keeps_its_own_filters():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    rows = [Row(params(top_k=1)), Row(params(top_p=1e-6)), Row(params(top_k=3))]
    for _ in range(20):
        picked = picks(logits, rows)
        assert picked[0] == int(logits[0].argmax()) and picked[1] == int(logits[1].argmax())
        assert picked[2] in logits[2].topk(3).indices.tolist()


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {picks(logits, [Row(params(top_p=0.7))])[0] for _ in range(200)}
    assert seen == {0, 1}  # 0.5 alone is under 0.7; the token that crosses it (0.3) is kept, no more


def kept(logits: torch.Tensor) -> torch.Tensor:
    return ~torch.isinf(logits)


def test_top_p_and_top_k_among_the_best_candidates_cut_what_the_full_sort_cuts(monkeypatch):
    """The short path (a top-k of NUCLEUS_CANDIDATES, here 16, then 64 of 4096) keeps exactly the tokens a sort of
    the whole vocabulary keeps, over peaked and flat rows, each row with its own temperature, top_p and top_k;
    batches whose nucleus is wider than the candidates fall back to the full sort."""
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", (16, 64))
    torch.manual_seed(0)
    for trial in range(40):
        logits = torch.randn(6, 4096) * (0.5, 2.0, 5.0, 10.0)[trial % 4]
        rows = [Row(params(temperature=(0.7, 1.0, 1.3)[b % 3], top_p=(0.7, 0.95, 0.5, 0.9, 1.0)[(b + trial) % 5],
                           top_k=(0, 0, 40, 0, 500, 7)[(b + trial) % 6])) for b in range(6)]
        short = filter_logits(logits, rows).logits
        scaled = logits / torch.tensor([[r.params.temperature] for r in rows])
        full = cut(scaled, [r.params.top_k or 4096 for r in rows], [r.params.top_p for r in rows], 4096).logits
        assert torch.equal(kept(short), kept(full)), trial
        torch.testing.assert_close(short[kept(short)], scaled[kept(short)])  # what is kept is left as it was


def test_a_nucleus_wider_than_the_candidates_is_found_by_the_full_sort(monkeypatch):
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", (8,))
    logits = torch.zeros(1, 100)  # flat: top_p 0.5 needs 50 tokens
    logits[0, 7] = 1.0
    assert cut(logits, [100], [0.5], 8) is None  # the best 8 hold less than half
    # the best is e / (e + 99) = 0.0267, each other 0.0098: 48 more stay under 0.5 before them, and the one crossing
    assert int(kept(filter_logits(logits, [Row(params(top_p=0.5))]).logits).sum()) == 50


def test_unseeded_rows_draw_among_the_candidates_what_the_whole_vocabulary_would_give(monkeypatch):
    """Drawing among the shortlist is the same distribution: a row whose nucleus is tokens 0 (p 0.5) and 1 (0.3)
    of 200 draws them 5:3, and never anything else."""
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", (8,))
    logits = torch.full((1, 200), -30.0)
    logits[0, :3] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    filtered = filter_logits(logits, [Row(params(top_p=0.7))])
    assert filtered.candidates is not None and filtered.candidates.shape == (1, 8)
    torch.manual_seed(0)
    drawn = [int(sampling.draw(filtered, [Row(params(top_p=0.7))])[0]) for _ in range(800)]
    assert set(drawn) == {0, 1} and abs(drawn.count(0) / 800 - 0.5 / 0.8) < 0.05


def test_rows_that_cut_nothing_are_not_sorted_and_top_p_one_keeps_every_top_k_token(monkeypatch):
    def no_sort(*args, **kwargs):
        raise AssertionError("sorted the whole vocabulary")

    logits = torch.randn(2, 300) * 30  # so peaked that float32 sums reach 1.0 long before the last token
    monkeypatch.setattr(torch, "sort", no_sort)
    assert torch.equal(filter_logits(logits, [Row(params(temperature=0.5))] * 2).logits, logits / 0.5)
    both = filter_logits(logits, [Row(params(top_k=200))] * 2).logits  # top_p 1: no top-p cut, even by rounding
    assert kept(both).sum(-1).tolist() == [200, 200]


def test_min_p_drops_tokens_under_its_share_of_the_best():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {picks(logits, [Row(params(min_p=0.5))])[0] for _ in range(300)}
    assert seen == {0, 1}  # 0.15 < 0.5 * 0.5


def test_mixed_batch_greedy_seeded_and_penalized_rows():
    torch.manual_seed(1)
    logits = torch.randn(4, 40)
    repeated = int(logits[3].argmax())
    rows = [params(temperature=0.0), params(seed=7), params(), params(temperature=0.0, repetition_penalty=5.0)]

    def run():
        counts = TokenCounts(40, torch.device("cpu"))
        batch = [Row(p, make_generator(p, torch.device("cpu"))) for p in rows]
        batch[3].slot = counts.assign([repeated], [])
        return picks(logits, batch, counts)

    first, second = run(), run()
    assert first[0] == int(logits[0].argmax())
    assert first[1] == second[1]  # a seeded row repeats with its seed, whatever its neighbours do
    assert first[3] != repeated  # the penalty pushed the repeated prompt token down


def test_a_seeded_row_draws_what_torch_draws_from_its_filtered_distribution():
    torch.manual_seed(2)
    logits = torch.randn(1, 64)
    p = params(seed=11, temperature=0.7, top_k=10)
    got = [picks(logits, [Row(p, generator)])[0] for generator in [make_generator(p, torch.device("cpu"))]
           for _ in range(5)]
    generator = make_generator(p, torch.device("cpu"))
    scaled = logits[0] / 0.7
    kth = scaled.topk(10).values[-1]
    probs = scaled.masked_fill(scaled < kth, float("-inf")).softmax(-1)
    assert got == [int(torch.multinomial(probs, 1, generator=generator)) for _ in range(5)]


def test_presence_and_frequency_penalties_follow_openais_formula():
    logits = torch.zeros(1, 6)
    counts = TokenCounts(6, torch.device("cpu"))
    p = params(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    row = Row(p, slot=counts.assign([5], [1, 1, 2], p.presence_penalty, p.frequency_penalty))
    # logit - count * frequency - (count > 0) * presence: token 1 -> -1.0, token 2 -> -0.75, the prompt's 5 -> 0
    # (OpenAI's penalties count the answer only); greedy then takes the first of the untouched zeros
    assert picks(logits, [row], counts) == [0]
    biased = logits.clone()
    biased[0, 0] = -0.8  # now token 0 (-0.8) is below the untouched ones
    assert picks(biased, [row], counts) == [3]
    counts.add([row.slot], [3])  # a sampled 3 is counted, and penalized, at once
    assert counts.output[row.slot].tolist() == [0, 2, 1, 1, 0, 0]
    assert counts.penalty[row.slot].tolist() == [0, 1.0, 0.75, 0.75, 0, 0]
    assert picks(biased, [row], counts) == [4]


def test_only_the_penalized_rows_of_a_batch_are_penalized():
    logits = torch.zeros(3, 6)
    counts = TokenCounts(6, torch.device("cpu"))
    p = params(temperature=0.0, frequency_penalty=2.0)
    rows = [Row(params(temperature=0.0)), Row(p, slot=counts.assign([], [0], 0.0, 2.0)), Row(params(temperature=0.0))]
    from service.engine.sampling import penalize

    penalized = logits.clone()
    penalize(penalized, rows, counts)
    assert penalized[1].tolist() == [-2.0, 0, 0, 0, 0, 0]
    assert not penalized[0].any() and not penalized[2].any()


def test_penalties_lower_each_logit_by_the_exact_amount():
    torch.manual_seed(3)
    logits = torch.randn(1, 10)
    counts = TokenCounts(10, torch.device("cpu"))
    generated = [4, 4, 4, 7]
    slot = counts.assign([0], generated, 1.0, -0.5)
    p = params(temperature=0.0, presence_penalty=1.0, frequency_penalty=-0.5, logprobs=False)
    from service.engine.sampling import penalize

    penalized = logits.clone()
    penalize(penalized, [Row(p, slot=slot)], counts)
    expected = logits.clone()
    expected[0, 4] -= 3 * -0.5 + 1.0
    expected[0, 7] -= 1 * -0.5 + 1.0
    assert torch.allclose(penalized, expected)


def test_logit_bias_forces_and_bans():
    torch.manual_seed(4)
    logits = torch.randn(2, 30)
    best = int(logits[1].argmax())
    rows = [Row(params(temperature=1.0, logit_bias=((17, 100.0),))), Row(params(temperature=0.0,
                                                                                  logit_bias=((best, -100.0),)))]
    for _ in range(10):
        forced, other = picks(logits, rows)
        assert forced == 17 and other != best


def test_min_new_tokens_holds_off_the_ends():
    logits = torch.zeros(1, 8)
    logits[0, 3] = 10.0  # EOS
    logits[0, 5] = 9.0  # a stop token id
    p = params(temperature=0.0, min_new_tokens=2, stop_token_ids=(5,))
    assert picks(logits, [Row(p, generated=0)]) not in ([3], [5])
    assert picks(logits, [Row(p, generated=1)]) not in ([3], [5])
    assert picks(logits, [Row(p, generated=2)]) == [3]
    assert picks(logits, [Row(params(temperature=0.0, min_new_tokens=2, ignore_eos=True), generated=0)]) == [3]


def test_logprobs_are_the_raw_log_softmax_and_greedy_is_top_zero():
    torch.manual_seed(5)
    logits = torch.randn(2, 40)
    rows = [Row(params(temperature=0.0, top_logprobs=3, repetition_penalty=1.0)),
            Row(params(temperature=0.5, logprobs=True))]
    tokens, infos = sample(logits, rows, eos_ids=EOS)
    expected = logits.log_softmax(-1)
    assert infos[0].top[0][0] == tokens[0] == int(logits[0].argmax())
    assert [i for i, _ in infos[0].top] == expected[0].topk(3).indices.tolist()
    for b in range(2):
        assert math.isclose(infos[b].logprob, float(expected[b, tokens[b]]), abs_tol=1e-6)
    assert infos[1].top == ()


def test_rows_that_ask_for_nothing_get_no_logprobs():
    tokens, infos = sample(torch.randn(2, 10), [Row(params(temperature=0.0)), Row(params())], eos_ids=EOS)
    assert infos == [None, None] and len(tokens) == 2


def test_token_counts_grow_past_their_first_slots():
    counts = TokenCounts(5, torch.device("cpu"), slots=1)
    slots = [counts.assign([0], [1]), counts.assign([2], [3, 3])]
    assert sorted(slots) == [0, 1]
    assert counts.output[slots[1]].tolist() == [0, 0, 0, 2, 0] and counts.prompt[slots[1], 2]
    assert counts.output[slots[0]].tolist() == [0, 1, 0, 0, 0]
