"""The callers' sampling set on the real default model through gRPC, checked against the model itself: logprobs
equal a float32 recomputation of the forward on the same ids, greedy tokens are top[0], logit_bias forces and bans,
min_new_tokens holds off the end, presence and frequency penalties pick what OpenAI's formula picks, n answers
with a seed are the seeded solo answers, token ids and stop_sequence say what was generated and what stopped it."""

from __future__ import annotations

import math

import pytest
import torch
from chat.v1 import chat_pb2, chat_pb2_grpc

PROMPT = "Name three fruits."


@pytest.fixture(scope="module")
def stub(channel):
    return chat_pb2_grpc.ChatServiceStub(channel)


def chat(stub, prompt: str = PROMPT, **params) -> chat_pb2.ChatResponse:
    return stub.Chat(chat_pb2.ChatRequest(prompt=prompt, params=chat_pb2.SamplingParams(**params)), timeout=120)


def prompt_ids(stub, prompt: str = PROMPT) -> list[int]:
    counted = stub.CountTokens(chat_pb2.ChatRequest(prompt=prompt, params=chat_pb2.SamplingParams(
        return_token_ids=True)), timeout=30)
    return list(counted.token_ids)


@torch.inference_mode()
def forward_logits(server, ids: list[int]) -> torch.Tensor:
    """The model's float32 logits [T, V] at every position of `ids`, by the plain transformers forward (the
    session server runs float32, dense weights)."""
    model = server.engine.loaded.model
    return model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float()


def test_logprobs_equal_the_models_own_log_softmax(stub, server):
    reply = chat(stub, temperature=0.8, seed=11, max_new_tokens=12, logprobs=True, top_logprobs=5)
    tokens = list(reply.tokens)
    assert len(tokens) == reply.usage.completion_tokens
    prompt = prompt_ids(stub)
    ids = prompt + [t.id for t in tokens]
    logprobs = forward_logits(server, ids).log_softmax(-1)[len(prompt) - 1:-1]  # [N, V]: before each token
    for position, token in enumerate(tokens):
        expected = logprobs[position]
        assert token.HasField("logprob")
        assert math.isclose(token.logprob, float(expected[token.id]), abs_tol=1e-4)
        top_values, top_ids = expected.topk(5)
        assert [t.id for t in token.top] == top_ids.tolist()
        assert all(math.isclose(t.logprob, v, abs_tol=1e-4) for t, v in zip(token.top, top_values.tolist(),
                                                                                  strict=True))
        if token.id in top_ids.tolist():  # a sampled token in the top 5 is listed there
            assert token.id in [t.id for t in token.top]
    assert "".join(t.text for t in tokens).strip() == reply.text


def test_greedy_tokens_are_top_zero(stub):
    reply = chat(stub, temperature=0.0, max_new_tokens=10, top_logprobs=3)
    assert reply.tokens and all(t.id == t.top[0].id and t.logprob == t.top[0].logprob for t in reply.tokens)
    assert all(t.logprob <= 0 and len(t.top) == 3 for t in reply.tokens)


def test_token_ids_without_logprobs(stub):
    reply = chat(stub, temperature=0.0, max_new_tokens=6, return_token_ids=True)
    assert len(reply.tokens) == 6 and all(not t.HasField("logprob") and not t.top for t in reply.tokens)
    assert b"".join(t.bytes for t in reply.tokens).decode().strip() == reply.text
    plain = chat(stub, temperature=0.0, max_new_tokens=6)
    assert plain.text == reply.text and not plain.tokens  # asking for nothing gets today's answer


def test_streamed_tokens_are_the_chat_tokens(stub):
    request = chat_pb2.ChatRequest(prompt=PROMPT, params=chat_pb2.SamplingParams(
        temperature=0.0, max_new_tokens=8, logprobs=True))
    streamed = [t for chunk in stub.StreamChat(request, timeout=120) for t in chunk.tokens]
    answered = stub.Chat(request, timeout=120).tokens
    assert [t.id for t in streamed] == [t.id for t in answered]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-5) for a, b in zip(streamed, answered, strict=True))


def test_logit_bias_forces_and_bans(stub, server):
    tokenizer = server.engine.loaded.tokenizer
    forced = tokenizer.encode_text(" banana")[0]
    reply = chat(stub, temperature=0.0, max_new_tokens=4, logit_bias={forced: 100.0}, return_token_ids=True)
    assert [t.id for t in reply.tokens] == [forced] * 4
    free = chat(stub, temperature=0.0, max_new_tokens=8, return_token_ids=True)
    banned = free.tokens[0].id
    reply = chat(stub, temperature=0.0, max_new_tokens=8, logit_bias={banned: -100.0}, return_token_ids=True)
    assert banned not in [t.id for t in reply.tokens]


def test_min_new_tokens_holds_off_the_end(stub, server):
    short = chat(stub, "Reply with just the word yes.", temperature=0.0, max_new_tokens=40, return_token_ids=True)
    assert short.finish_reason == chat_pb2.FINISH_REASON_STOP
    ended = len(short.tokens)
    held = chat(stub, "Reply with just the word yes.", temperature=0.0, max_new_tokens=40,
                min_new_tokens=ended + 5, return_token_ids=True)
    eos = server.engine.loaded.tokenizer.eos_token_ids
    assert len(held.tokens) >= ended + 5
    assert not any(t.id in eos for t in held.tokens[:ended + 4])


@pytest.mark.parametrize("presence, frequency", [(0.0, 2.0), (1.5, 0.0), (-1.0, 0.5)])
def test_penalties_pick_what_openais_formula_picks(stub, server, presence, frequency):
    """Greedy under penalties: every token is the argmax of logit - frequency * count - presence * (count > 0),
    counted over the answer so far, on the model's own float32 logits."""
    reply = chat(stub, "Repeat the word cat many times.", temperature=0.0, max_new_tokens=16,
                 presence_penalty=presence, frequency_penalty=frequency, return_token_ids=True)
    prompt = prompt_ids(stub, "Repeat the word cat many times.")
    answer = [t.id for t in reply.tokens]
    logits = forward_logits(server, prompt + answer)[len(prompt) - 1:-1]  # [N, V]
    counts = torch.zeros(logits.shape[-1])
    for position, token in enumerate(answer):
        scores = logits[position] - frequency * counts - presence * (counts > 0).float()
        best = scores.max()
        assert scores[token] >= best - 1e-4, (position, token, int(scores.argmax()))
        counts[token] += 1
    if frequency == 2.0:  # strong enough to change this answer (measured: "The cat is a cat." without it)
        unpenalized = chat(stub, "Repeat the word cat many times.", temperature=0.0, max_new_tokens=16,
                           return_token_ids=True)
        assert [t.id for t in unpenalized.tokens] != answer


def test_n_seeded_answers_are_the_solo_seeded_answers(stub):
    params = dict(temperature=1.0, top_p=0.95, max_new_tokens=16)
    reply = chat(stub, n=3, seed=42, **params)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    solo = [chat(stub, seed=42 + i, **params).text for i in range(3)]
    assert [c.text for c in reply.choices] == solo
    assert reply.text == solo[0] and reply.finish_reason == reply.choices[0].finish_reason
    assert reply.usage.completion_tokens == sum(len(chat(stub, seed=42 + i, return_token_ids=True, **params).tokens)
                                                for i in range(3))


def test_n_streams_carry_each_answers_index(stub):
    request = chat_pb2.ChatRequest(prompt=PROMPT, params=chat_pb2.SamplingParams(
        n=2, temperature=1.0, seed=5, max_new_tokens=10))
    chunks = list(stub.StreamChat(request, timeout=120))
    texts = {i: "".join(c.delta for c in chunks if c.index == i) for i in (0, 1)}
    finished = [c.index for c in chunks if c.finish_reason != chat_pb2.FINISH_REASON_UNSPECIFIED]
    assert sorted(finished) == [0, 1]
    reply = stub.Chat(request, timeout=120)
    assert [texts[0].strip(), texts[1].strip()] == [c.text for c in reply.choices]


def test_stop_sequence_names_the_stop_that_matched(stub, server):
    free = chat(stub, temperature=0.0, max_new_tokens=20)
    word = free.text.split()[1]
    stopped = stub.Chat(chat_pb2.ChatRequest(prompt=PROMPT, params=chat_pb2.SamplingParams(
        temperature=0.0, max_new_tokens=20, stop=["zzz", word])), timeout=120)
    assert stopped.finish_reason == chat_pb2.FINISH_REASON_STOP_SEQUENCE and stopped.stop_sequence == word
    token = chat(stub, temperature=0.0, max_new_tokens=20, return_token_ids=True).tokens[2]
    by_id = chat(stub, temperature=0.0, max_new_tokens=20, stop_token_ids=[token.id])
    assert by_id.finish_reason == chat_pb2.FINISH_REASON_STOP_SEQUENCE
    assert by_id.stop_sequence == server.engine.loaded.tokenizer.token_bytes(token.id).decode()
    assert free.stop_sequence == ""


def test_min_p_of_one_is_greedy(stub):
    greedy = chat(stub, temperature=0.0, max_new_tokens=12).text
    assert chat(stub, temperature=1.0, min_p=1.0, seed=3, max_new_tokens=12).text == greedy
