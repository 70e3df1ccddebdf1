"""The slot KV cache and the model runner, tested directly on a tiny random Llama (as TGI tests its batch
operations): prefill, chunked prefill, decode, join and leave, each against the plain transformers forward."""

from __future__ import annotations

import pytest
import torch

from service.engine.kv_cache import KVCache
from service.engine.model_runner import ModelRunner, decode_buckets
from service.engine.model_runner import PromptChunk as Chunk
from service.models.quant import kernels
from tests.service.engine.tiny_llama import VOCAB, reference, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(params=["own forward", "own forward on torch ops", "transformers modules"])
def path(request) -> str:
    """Every runner test runs through our own Llama forward (with our own CPU kernels for its small ops where they
    are built, and on torch's ops alone) and through the transformers modules (the generic path every other model,
    GLM included, takes)."""
    return request.param


@pytest.fixture
def runner_for(path):
    def make(model, slots=4, capacity=128) -> ModelRunner:
        runner = ModelRunner(model, slots=slots, capacity=capacity)
        assert runner.fast is not None  # a plain Llama has our own forward
        assert (runner.fast.ops is not None) == kernels.available()
        if path == "own forward on torch ops":
            runner.fast.ops = None
        if path == "transformers modules":
            runner.fast = None
        return runner

    return make


def decode(runner: ModelRunner, rows: dict[int, tuple[int, int]]) -> torch.Tensor:
    """rows: slot -> (token, position); slots in range that are not listed are padding."""
    width = max(rows) + 1
    tokens, positions = [0] * width, [0] * width
    for slot, (token, position) in rows.items():
        tokens[slot], positions[slot] = token, position
    return runner.decode(tokens, positions)


def test_kv_cache_shape_and_slots():
    kv = KVCache(layers=3, kv_heads=2, head_dim=8, slots=4, capacity=16, dtype=torch.float32,
                 device=torch.device("cpu"))
    assert kv.data.shape == (3, 2, 4, 2, 16, 8)
    assert [kv.allocate() for _ in range(3)] == [0, 1, 2]
    assert kv.highest_used() == 3 and kv.free_slots == 1
    kv.release(1)
    assert kv.highest_used() == 3 and kv.allocate() == 1  # the lowest free slot is reused first
    kv.release(2)
    assert kv.highest_used() == 2
    assert torch.all(kv.data[:, :, :2] == 0)  # first use zeroes a slot: unwritten positions are finite


def test_kv_cache_write_puts_each_row_at_its_own_positions():
    kv = KVCache(layers=1, kv_heads=2, head_dim=4, slots=3, capacity=8, dtype=torch.float32,
                 device=torch.device("cpu"))
    for _ in range(3):
        kv.allocate()
    keys = torch.randn(2, 2, 1, 4)  # [B, H_kv, N, D]
    kv.write(0, torch.tensor([2, 0]), torch.tensor([[5], [1]]), keys, -keys)
    k, v = kv.layer(0)
    assert torch.equal(k[2, :, 5], keys[0, :, 0]) and torch.equal(k[0, :, 1], keys[1, :, 0])
    assert torch.equal(v[2, :, 5], -keys[0, :, 0])
    assert torch.count_nonzero(k) == 2 * 2 * 4  # nothing else was touched
    entry = kv.copy_out(2, 6)
    assert entry.shape == (1, 2, 2, 6, 4)
    kv.copy_in(1, entry, 6)
    assert torch.equal(kv.layer(0)[0][1, :, :6], k[2, :, :6])


def test_prefill_and_decode_equal_the_plain_forward(model, runner_for):
    runner = runner_for(model)
    prompt = [5, 17, 42, 8, 33, 2, 71]
    slot = runner.kv.allocate()
    logits = runner.prefill([Chunk(slot, 0, prompt)], pad_id=0)[0]
    torch.testing.assert_close(logits, reference(model, prompt), rtol=1e-5, atol=1e-5)
    ids = prompt + [int(logits.argmax())]
    for _ in range(5):
        logits = decode(runner, {slot: (ids[-1], len(ids) - 1)})[slot]
        torch.testing.assert_close(logits, reference(model, ids), rtol=1e-5, atol=1e-5)
        ids.append(int(logits.argmax()))


def test_chunked_prefill_equals_prefill_in_one_piece(model, runner_for):
    runner = runner_for(model)
    prompt = list(range(3, 90))
    slot = runner.kv.allocate()
    for start in range(0, len(prompt), 20):
        logits = runner.prefill([Chunk(slot, start, prompt[start:start + 20])], pad_id=0)[0]
    torch.testing.assert_close(logits, reference(model, prompt), rtol=1e-5, atol=1e-5)


def test_batched_prefill_of_different_lengths(model, runner_for):
    runner = runner_for(model)
    prompts = [[1, 2, 3], list(range(10, 40)), [7] * 11]
    slots = [runner.kv.allocate() for _ in prompts]
    logits = runner.prefill([Chunk(s, 0, p) for s, p in zip(slots, prompts, strict=True)], pad_id=0)
    for row, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[row], reference(model, prompt), rtol=1e-5, atol=1e-5)


def test_joining_and_leaving_leave_other_rows_unchanged(model, runner_for):
    """Row A decodes alone, then B joins in another slot, then A leaves: B's and A's logits at every step
    equal the plain forward of their own sequences, i.e. decoding in a batch equals decoding alone."""
    runner = runner_for(model)
    a, b = [4, 8, 15, 16, 23, 42], [9, 9, 1, 3]
    slot_a = runner.kv.allocate()
    a.append(int(runner.prefill([Chunk(slot_a, 0, a)], pad_id=0)[0].argmax()))
    a.append(int(decode(runner, {slot_a: (a[-1], len(a) - 1)})[slot_a].argmax()))
    slot_b = runner.kv.allocate()
    b.append(int(runner.prefill([Chunk(slot_b, 0, b)], pad_id=0)[0].argmax()))
    for _ in range(3):
        logits = decode(runner, {slot_a: (a[-1], len(a) - 1), slot_b: (b[-1], len(b) - 1)})
        torch.testing.assert_close(logits[slot_a], reference(model, a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[slot_b], reference(model, b), rtol=1e-5, atol=1e-5)
        a.append(int(logits[slot_a].argmax()))
        b.append(int(logits[slot_b].argmax()))
    runner.kv.release(slot_a)  # A leaves; B's cache is not copied or moved
    for _ in range(3):
        logits = decode(runner, {slot_b: (b[-1], len(b) - 1)})
        torch.testing.assert_close(logits[slot_b], reference(model, b), rtol=1e-5, atol=1e-5)
        b.append(int(logits[slot_b].argmax()))


def test_decode_buckets_are_powers_of_two_and_the_slot_count():
    assert decode_buckets(1) == [1]
    assert decode_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]


def test_a_step_runs_at_its_bucket_and_padding_rows_change_nothing(model, runner_for):
    """Three rows run as a bucket of four (slots 0..3 of 6); the real rows equal the plain forward."""
    runner = runner_for(model, slots=6)
    assert runner.buckets == [1, 2, 4, 6]
    seqs = [[4, 8, 15], [16, 23, 42, 7], [1, 2]]
    slots = [runner.kv.allocate() for _ in seqs]
    for slot, ids in zip(slots, seqs, strict=True):
        ids.append(int(runner.prefill([Chunk(slot, 0, ids)], pad_id=0)[0].argmax()))
    for _ in range(2):
        logits = decode(runner, {slot: (ids[-1], len(ids) - 1) for slot, ids in zip(slots, seqs, strict=True)})
        assert logits.shape == (4, VOCAB)
        for slot, ids in zip(slots, seqs, strict=True):
            torch.testing.assert_close(logits[slot], reference(model, ids), rtol=1e-5, atol=1e-5)
            ids.append(int(logits[slot].argmax()))


def test_a_reused_prefix_continues_like_the_original(model, runner_for):
    runner = runner_for(model)
    prompt = list(range(20, 60))
    slot = runner.kv.allocate()
    runner.prefill([Chunk(slot, 0, prompt[:30])], pad_id=0)
    entry = runner.kv.copy_out(slot, 30)
    runner.kv.release(slot)
    other = runner.kv.allocate()
    runner.kv.copy_in(other, entry, 30)
    logits = runner.prefill([Chunk(other, 30, prompt[30:])], pad_id=0)[0]
    torch.testing.assert_close(logits, reference(model, prompt), rtol=1e-5, atol=1e-5)


def test_own_forward_over_packed_int4_layers_equals_the_modules(model, runner_for):
    """With int4 layers (fused q/k/v and gate/up), our forward computes what the transformers modules do."""
    import copy

    from service.models.quant.quantize import Quantization, quantize_model

    quantized = copy.deepcopy(model)
    quantize_model(quantized, Quantization.INT4)
    runner = runner_for(quantized)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    slot = runner.kv.allocate()
    logits = runner.prefill([Chunk(slot, 0, prompt)], pad_id=0)[0]
    torch.testing.assert_close(logits, reference(quantized, prompt), rtol=1e-3, atol=1e-3)


def test_dense_copies_are_blocked_where_they_run_and_dropped_where_they_do_not(model):
    """Packed layers with dense copies (as the GGUF loader keeps them): the layers our forward runs keep theirs
    in oneDNN's layout, the model's own ones it runs fused instead lose theirs; prefill of
    many rows (dense copies) and decode of one (packed kernels) both still compute the model."""
    import copy

    from service.models.quant.kernel_choice import switchable
    from service.models.quant.quantize import Quantization, quantize_model

    quantized = copy.deepcopy(model)
    quantize_model(quantized, Quantization.INT4)
    for layer in [m for m in quantized.modules() if hasattr(m, "packed_matmul")]:
        layer.keep_dense(layer.packed_matmul(torch.eye(layer.in_features)).T.float().contiguous())
    runner = ModelRunner(quantized, slots=2, capacity=128)
    running = {id(m) for m in [*runner.fast.modules(), runner.lm_head]}
    packed = [m for m in quantized.modules() if hasattr(m, "packed_matmul")]
    dropped = [m for m in packed if id(m) not in running]  # gate and up, which run fused as gate_up
    assert dropped and not switchable(dropped)
    assert all(m.dense_blocked is not None for m in switchable(runner.fast.modules()))
    assert all(m.dense_blocked is not None for m in packed if id(m) in running)
    prompt = list(range(3, 40))  # 37 rows: past every switch, so the prefill runs on the dense copies
    slot = runner.kv.allocate()
    logits = runner.prefill([Chunk(slot, 0, prompt)], pad_id=0)[0]
    torch.testing.assert_close(logits, reference(quantized, prompt), rtol=2e-2, atol=2e-2)
    prompt.append(int(logits.argmax()))
    logits = runner.decode([prompt[-1]], [len(prompt) - 1])[0]
    torch.testing.assert_close(logits, reference(quantized, prompt), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("outs, width", [((64, 32, 32), 64), ((128, 128), 64), ((576, 192, 192), 576)])
def test_fused_int4_layers_equal_the_separate_ones(outs, width):
    from service.models.decoder import fuse
    from service.models.quant.int4 import Int4Linear, quantize_int4

    torch.manual_seed(0)
    layers = [Int4Linear.from_quantized(*quantize_int4(torch.randn(o, width), 32), 32, compute_dtype=torch.bfloat16)
              for o in outs]
    x = torch.randn(3, width)
    assert torch.equal(fuse(layers)(x), torch.cat([layer(x) for layer in layers], dim=-1))


@pytest.mark.parametrize("ops", ["own ops", "torch ops"])
def test_glm_takes_our_forward_and_equals_its_modules(ops):
    """ChatGLM2 (transformers' GLM: q/k/v biases, rotary in interleaved pairs over half the head) runs our own
    forward too; prefill and decode equal the transformers modules on the same slot cache."""
    from pathlib import Path

    from service.models.chatglm2 import load_chatglm2
    from service.models.quant.quantize import Quantization

    data = Path(__file__).resolve().parents[2] / "data" / "chatglm2-tiny"
    model = load_chatglm2(data, torch.float32, torch.device("cpu"), Quantization.NONE).model
    ours, theirs = ModelRunner(model, slots=2, capacity=64), ModelRunner(model, slots=2, capacity=64)
    assert ours.fast is not None and ours.fast.pairs > 0
    if ops == "torch ops":
        ours.fast.ops = None
    theirs.fast = None
    prompt = [5, 17, 3, 99, 42, 7]
    for runner in (ours, theirs):
        runner.kv.allocate()
    torch.testing.assert_close(ours.prefill([Chunk(0, 0, prompt)], 0), theirs.prefill([Chunk(0, 0, prompt)], 0),
                               rtol=1e-5, atol=1e-5)
    for position, token in enumerate([11, 23, 5], start=len(prompt)):
        torch.testing.assert_close(ours.decode([token], [position]), theirs.decode([token], [position]),
                                   rtol=1e-5, atol=1e-5)
