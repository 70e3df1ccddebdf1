"""Per-row sampling over a batch: greedy, batched temperature / top-k / top-p, seeded rows, repetition penalty."""

from __future__ import annotations

import torch

from service.engine.request import SamplingParams
from service.engine.sampling import make_generator, next_tokens, sample_batch


def params(**kw) -> SamplingParams:
    fields = dict(max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0) | kw
    return SamplingParams(**fields)


def test_each_row_keeps_its_own_filters():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    rows = [params(top_k=1), params(top_p=1e-6), params(top_k=3)]
    for _ in range(20):
        picked = sample_batch(logits, rows)
        assert picked[0] == int(logits[0].argmax()) and picked[1] == int(logits[1].argmax())
        assert picked[2] in logits[2].topk(3).indices.tolist()


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {sample_batch(logits, [params(top_p=0.7)])[0] for _ in range(200)}
    assert seen == {0, 1}  # 0.5 alone is under 0.7; the token that crosses it (0.3) is kept, no more


def test_mixed_batch_greedy_seeded_and_penalized_rows():
    torch.manual_seed(1)
    logits = torch.randn(4, 40)
    rows = [params(temperature=0.0), params(seed=7), params(), params(temperature=0.0, repetition_penalty=5.0)]
    seen = [None, None, None, torch.tensor([int(logits[3].argmax())])]

    def run():
        generators = [make_generator(p, torch.device("cpu")) for p in rows]
        return next_tokens(logits, rows, generators, seen)

    first, second = run(), run()
    assert first[0] == int(logits[0].argmax())
    assert first[1] == second[1]  # a seeded row repeats with its seed, whatever its neighbours do
    assert first[3] != int(logits[3].argmax())  # the penalty pushed the repeated token down
