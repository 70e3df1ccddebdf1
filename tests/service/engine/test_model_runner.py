"""The paged KV pool and the model runner, tested directly on a tiny random Llama (as TGI tests its batch
operations): prefill, chunked prefill, decode, mixed steps, join and leave, shared prefix blocks, each against
the plain transformers forward."""

from __future__ import annotations

import pytest
import torch

from service.engine.attention_plan import AttentionPlan, Kernel
from service.engine.block_manager import BlockManager
from service.engine.kv_cache import KVPool
from service.engine.model_runner import ModelRunner, StepRow, decode_buckets
from service.engine.solo import Solo
from service.models.quant import kernels
from tests.service.engine.tiny_llama import reference, tiny_llama

BLOCK = 4  # small blocks: short test prompts cross many block boundaries


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


# what a GPU runs (service/engine/attention_plan.py): one-token rows through SDPA with their heads grouped, prompt
# chunks with a lower-right causal bias instead of a mask; the kernels named are a GPU's, CPU runs its own
GPU_PLAN = AttentionPlan(decode=Kernel.EFFICIENT, chunks=Kernel.FLASH, sdpa_decode=True, lower_right=True)


@pytest.fixture(params=["own forward", "own forward on torch ops", "own forward, a GPU's attention",
                        "transformers modules"])
def path(request) -> str:
    """Every runner test runs through our own Llama forward (with our own CPU kernels for its small ops where they
    are built, on torch's ops alone, and on torch's ops with the attention calls a GPU makes) and through the
    transformers modules (the generic path every other model takes)."""
    return request.param


@pytest.fixture
def runner_for(path):
    def make(model, blocks=128, max_rows=4, max_context=256) -> ModelRunner:
        plan = GPU_PLAN if path == "own forward, a GPU's attention" else None
        runner = ModelRunner(model, num_blocks=blocks, block_size=BLOCK, max_rows=max_rows, max_context=max_context,
                             attention_plan=plan)
        assert runner.fast is not None  # a plain Llama has our own forward
        assert (runner.fast.ops is not None) == (kernels.available() and runner.device.type == "cpu")
        if path in ("own forward on torch ops", "own forward, a GPU's attention"):
            runner.fast.ops = None
        if path == "transformers modules":
            runner.fast = None
        return runner

    return make


def close(got: torch.Tensor, model, ids: list[int], tol: float = 1e-5) -> None:
    torch.testing.assert_close(got, reference(model, ids), rtol=tol, atol=tol)


def test_kv_pool_writes_each_token_at_its_slot_and_gathers_tables_in_order():
    pool = KVPool(layers=1, kv_heads=2, head_dim=4, num_blocks=5, block_size=2, dtype=torch.float32,
                  device=torch.device("cpu"))
    assert pool.data.shape == (1, 2, 5, 2, 2, 4)
    pool.zero([1, 2, 3, 4])
    keys = torch.randn(3, 2, 4)  # [N, H_kv, D]
    pool.write(0, torch.tensor([7, 2, 3]), keys, -keys)  # block 3 offset 1, block 1 offsets 0 and 1
    k, v = pool.gather(0, torch.tensor([[1, 3]]))  # [1, H_kv, 4, D]: block 1's two positions, then block 3's
    assert torch.equal(k[0, :, 0], keys[1]) and torch.equal(k[0, :, 1], keys[2]) and torch.equal(k[0, :, 3], keys[0])
    assert torch.equal(v[0, :, 3], -keys[0]) and torch.count_nonzero(k[0, :, 2]) == 0
    assert torch.count_nonzero(pool.data) == 2 * 3 * 2 * 4  # nothing else was touched


def test_prefill_and_decode_equal_the_plain_forward(model, runner_for):
    solo = Solo(runner_for(model))
    ids = [5, 17, 42, 8, 33, 2, 71]
    logits = solo.prefill(ids)
    close(logits, model, ids)
    for _ in range(6):
        ids.append(int(logits.argmax()))
        logits = solo.decode(ids[-1])
        close(logits, model, ids)


def test_chunked_prefill_equals_prefill_in_one_piece(model, runner_for):
    solo = Solo(runner_for(model))
    prompt = list(range(3, 90))
    for start in range(0, len(prompt), 20):
        logits = solo.prefill(prompt[start:start + 20])
    close(logits, model, prompt)


def test_one_step_of_prompt_chunks_and_decode_tokens_equals_each_alone(model, runner_for):
    """A decoding row, two prompts of different lengths and a chunk that ends no prompt, in one step: each
    wanted row's logits equal its own plain forward; the unwanted chunk gives none, yet its KV is written."""
    runner = runner_for(model)
    blocks = BlockManager(runner.kv.num_blocks, BLOCK)
    decoding, short, long, partial = [9, 9, 1, 3, 12], [1, 2, 3], list(range(10, 90)), list(range(50, 80))
    tables = [blocks.allocate([], n) for n in (len(decoding) + 1, len(short), len(long), len(partial))]
    runner.kv.zero(blocks.take_fresh())
    first = runner.run([StepRow(tables[0], 0, decoding)])[0]
    decoding.append(int(first.argmax()))
    logits = runner.run([StepRow(tables[1], 0, short), StepRow(tables[0], len(decoding) - 1, decoding[-1:]),
                         StepRow(tables[3], 0, partial[:20], wanted=False), StepRow(tables[2], 0, long)])
    assert logits.shape[0] == 3
    close(logits[0], model, short)
    close(logits[1], model, decoding)
    close(logits[2], model, long)
    rest = runner.run([StepRow(tables[3], 20, partial[20:])])[0]
    close(rest, model, partial)


def test_joining_and_leaving_leave_other_rows_unchanged(model, runner_for):
    """Row A decodes alone, then B joins, then A leaves and its blocks go to C: B's logits at every step equal
    the plain forward of its own sequence, i.e. decoding in a batch equals decoding alone."""
    runner = runner_for(model)
    blocks = BlockManager(runner.kv.num_blocks, BLOCK)
    a, b = [4, 8, 15, 16, 23, 42], [9, 9, 1, 3]
    table_a, table_b = blocks.allocate([], len(a)), blocks.allocate([], len(b))
    runner.kv.zero(blocks.take_fresh())

    def decode(rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """One token for each (ids, table): the ids' last one, at its position."""
        for ids, table in rows:
            blocks.grow(table, len(ids))
        runner.kv.zero(blocks.take_fresh())
        return runner.run([StepRow(table, len(ids) - 1, ids[-1:]) for ids, table in rows])

    a.append(int(runner.run([StepRow(table_a, 0, a)])[0].argmax()))
    a.append(int(decode([(a, table_a)])[0].argmax()))
    b.append(int(runner.run([StepRow(table_b, 0, b)])[0].argmax()))
    for _ in range(3):
        logits = decode([(a, table_a), (b, table_b)])
        close(logits[0], model, a)
        close(logits[1], model, b)
        a.append(int(logits[0].argmax()))
        b.append(int(logits[1].argmax()))
    freed = list(table_a)
    blocks.release(table_a)  # A leaves; B's blocks are not copied or moved
    c = Solo(runner, blocks)
    close(c.prefill([7] * 12), model, [7] * 12)
    assert set(c.table) & set(freed)  # C took A's blocks
    for _ in range(3):
        logits = decode([(b, table_b)])[0]
        close(logits, model, b)
        b.append(int(logits.argmax()))


def test_decode_buckets_are_powers_of_two_and_the_row_limit():
    assert decode_buckets(1) == [1]
    assert decode_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert decode_buckets(20) == [1, 2, 4, 8, 16, 20]


def test_a_shared_prefix_continues_like_the_original_without_a_copy(model, runner_for):
    """B's table starts with A's sealed blocks (the same 32 prompt tokens): B computes only the rest, and its
    logits equal the plain forward of its whole prompt; A's blocks are held twice, not copied."""
    runner = runner_for(model)
    blocks = BlockManager(runner.kv.num_blocks, BLOCK)
    shared, a_rest, b_rest = list(range(20, 52)), [3, 4, 5], [60, 61, 62, 63, 64]
    solo_a = Solo(runner, blocks)
    close(solo_a.prefill(shared + a_rest), model, shared + a_rest)
    blocks.seal(solo_a.table, shared + a_rest, len(shared + a_rest), 0)
    found = blocks.match(shared + b_rest, limit=len(shared) // BLOCK)
    assert found == solo_a.table[:len(shared) // BLOCK]
    table = blocks.allocate(found, len(shared + b_rest))
    runner.kv.zero(blocks.take_fresh())
    assert all(blocks.blocks[i].ref_count == 2 for i in found)
    logits = runner.run([StepRow(table, len(shared), b_rest)])[0]
    close(logits, model, shared + b_rest)


def test_scattered_blocks_equal_contiguous_ones(model, runner_for):
    """Blocks handed out in any order (here descending, as after much churn) hold a sequence just the same."""
    runner = runner_for(model)
    table = list(range(40, 20, -1))  # 20 blocks of 4: 80 positions
    runner.kv.zero(table)
    ids = list(range(5, 60))
    close(runner.run([StepRow(table, 0, ids)])[0], model, ids)
    ids.append(11)
    close(runner.run([StepRow(table, len(ids) - 1, ids[-1:])])[0], model, ids)


def test_own_forward_over_packed_int4_layers_equals_the_modules(model, runner_for):
    """With int4 layers (fused q/k/v and gate/up), our forward computes what the transformers modules do."""
    import copy

    from service.models.quant.quantize import Quantization, quantize_model

    quantized = copy.deepcopy(model)
    quantize_model(quantized, Quantization.INT4)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    close(Solo(runner_for(quantized)).prefill(prompt), quantized, prompt, tol=1e-3)


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
    runner = ModelRunner(quantized, num_blocks=64, block_size=BLOCK, max_rows=2, max_context=128)
    running = {id(m) for m in [*runner.fast.modules(), runner.lm_head]}
    packed = [m for m in quantized.modules() if hasattr(m, "packed_matmul")]
    dropped = [m for m in packed if id(m) not in running]  # gate and up, which run fused as gate_up
    assert dropped and not switchable(dropped)
    assert all(m.dense_blocked is not None for m in switchable(runner.fast.modules()))
    assert all(m.dense_blocked is not None for m in packed if id(m) in running)
    prompt = list(range(3, 40))  # 37 rows: past every switch, so the prefill runs on the dense copies
    solo = Solo(runner)
    logits = solo.prefill(prompt)
    close(logits, quantized, prompt, tol=2e-2)
    prompt.append(int(logits.argmax()))
    close(solo.decode(prompt[-1]), quantized, prompt, tol=2e-2)


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
    forward too; prefill and decode equal the transformers modules over the same kind of paged pool."""
    from pathlib import Path

    from service.models.chatglm2 import load_chatglm2
    from service.models.quant.quantize import Quantization

    data = Path(__file__).resolve().parents[2] / "data" / "chatglm2-tiny"
    model = load_chatglm2(data, torch.float32, torch.device("cpu"), Quantization.NONE).model
    ours, theirs = (ModelRunner(model, num_blocks=32, block_size=BLOCK, max_rows=2, max_context=64)
                    for _ in range(2))
    assert ours.fast is not None and ours.fast.pairs > 0
    if ops == "torch ops":
        ours.fast.ops = None
    theirs.fast = None
    a, b = Solo(ours), Solo(theirs)
    prompt = [5, 17, 3, 99, 42, 7]
    torch.testing.assert_close(a.prefill(prompt), b.prefill(prompt), rtol=1e-5, atol=1e-5)
    for token in [11, 23, 5]:
        torch.testing.assert_close(a.decode(token), b.decode(token), rtol=1e-5, atol=1e-5)
