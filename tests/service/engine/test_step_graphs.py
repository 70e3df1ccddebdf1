"""service/engine/step_graphs.py: decode steps captured (CUDA graphs) or compiled, against the plain step.

CI has no GPU: the CUDA capture itself is replaced by a stand-in that records the step and re-runs it on
replay into the same output tensor. Everything around it (static input buffers, the choice of graph per
batch bucket and block-table width, padding rows in the scratch block, the output read back) is what these
tests check.
"""

from __future__ import annotations

import pytest
import torch

from service.engine.block_manager import BlockManager
from service.engine.model_runner import ModelRunner, StepRow
from service.engine.step_graphs import (
    CapturedSteps,
    CompiledSteps,
    StepMode,
    make_steps,
    step_modes,
    table_widths,
)
from tests.service.engine.tiny_llama import VOCAB, reference, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


class FakeGraphs:
    """capture(run, pool) as CUDA graphs would do it, on CPU: `replay` recomputes into the captured output."""

    def __init__(self):
        self.captured: list[tuple[int, int]] = []
        self.replays = 0

    def __call__(self, run, pool):
        output = run()
        self.captured.append(tuple(output.shape))

        def replay():
            self.replays += 1
            output.copy_(run())

        return replay, output, pool


def test_table_widths_are_powers_of_two_up_to_the_widest_table():
    assert table_widths(128, 16) == [16, 32, 64, 128]  # 256 .. 2048 positions
    assert table_widths(63, 16) == [16, 32, 63]
    assert table_widths(7, 16) == [7]


def test_compile_auto_means_compiled_graphs_on_cuda_falling_back_to_graphs_and_nothing_on_cpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert step_modes("auto", cuda) == (StepMode.COMPILED_GRAPHS, StepMode.GRAPHS)
    assert step_modes("auto", cpu) == (StepMode.EAGER, None)
    assert step_modes("on", cuda) == (StepMode.COMPILED_GRAPHS, None)  # asked for: a failure stops the start
    assert step_modes("on", cpu) == (StepMode.COMPILED, None)
    assert step_modes("graphs", torch.device("cuda:1")) == (StepMode.GRAPHS, None)
    assert step_modes("off", cuda) == (StepMode.EAGER, None)
    with pytest.raises(ValueError, match="--compile graphs: CUDA graphs need a CUDA device, and this one is cpu"):
        step_modes("graphs", cpu)


def runner_for(model, max_rows: int = 4, max_context: int = 512) -> ModelRunner:
    return ModelRunner(model, num_blocks=64, block_size=16, max_rows=max_rows, max_context=max_context)


def decode_three(model, runner: ModelRunner, steps: int = 3) -> None:
    """Three sequences of different lengths decode together (a bucket of 4: one padding row); every step's
    logits equal the plain forward."""
    blocks = BlockManager(runner.kv.num_blocks, runner.block_size)
    seqs = [[4, 8, 15], [16, 23, 42, 7], [1, 2]]
    tables = [blocks.allocate([], 64) for _ in seqs]
    runner.kv.zero(blocks.take_fresh())
    for table, ids in zip(tables, seqs, strict=True):
        ids.append(int(runner.run([StepRow(table, 0, ids)])[0].argmax()))
    for _ in range(steps):
        logits = runner.run([StepRow(t, len(ids) - 1, ids[-1:]) for t, ids in zip(tables, seqs, strict=True)])
        assert logits.shape == (3, VOCAB)
        for row, ids in enumerate(seqs):
            torch.testing.assert_close(logits[row], reference(model, ids), rtol=1e-5, atol=1e-5)
            ids.append(int(logits[row].argmax()))


def test_captured_steps_replay_from_static_buffers(model):
    runner = runner_for(model)
    graphs = FakeGraphs()
    runner.steps = CapturedSteps(runner.decode_step, runner.buckets, runner.max_blocks, 16, runner.device,
                                 capture=graphs)
    assert sorted(runner.steps.graphs) == [(rows, width) for rows in (1, 2, 4) for width in (16, 32)]
    assert (4, VOCAB) in graphs.captured and (1, VOCAB) in graphs.captured
    decode_three(model, runner)
    assert graphs.replays == 3  # every decode step replayed a captured graph (bucket 4, 16 blocks)


def test_captured_steps_pick_the_narrowest_table_width_that_holds_the_step(model):
    runner = runner_for(model, max_rows=2)
    steps = CapturedSteps(runner.decode_step, runner.buckets, runner.max_blocks, 16, runner.device,
                          capture=FakeGraphs())
    assert [steps.table_width(n) for n in (1, 16, 17, 32)] == [16, 16, 32, 32]


def test_compiled_steps_equal_the_plain_step(model):
    """Dynamo traces the step per bucket (the eager backend keeps CI fast; inductor is what --compile uses)."""
    runner = runner_for(model)
    runner.steps = CompiledSteps(runner.decode_step, runner.buckets, runner.device, 16, backend="eager")
    decode_three(model, runner)


class CountingBackend:
    """A dynamo backend that runs each traced graph as it is, and counts the graphs and their runs."""

    def __init__(self):
        self.graphs = 0
        self.runs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1

        def run(*args):
            self.runs += 1
            return graph_module.forward(*args)

        return run


def test_compiled_graphs_capture_the_compiled_step(model):
    """COMPILED_GRAPHS: what is captured for every bucket and width, and replayed, is the step dynamo traced."""
    runner, graphs, backend = runner_for(model), FakeGraphs(), CountingBackend()
    runner.steps = make_steps(StepMode.COMPILED_GRAPHS, None, runner.decode_step, runner.buckets, runner.max_blocks,
                              16, runner.device, backend=backend, capture=graphs)
    assert isinstance(runner.steps, CapturedSteps) and runner.steps.compiled
    assert sorted(runner.steps.graphs) == [(rows, width) for rows in (1, 2, 4) for width in (16, 32)]
    assert backend.graphs > 0
    before = backend.runs
    decode_three(model, runner)
    assert graphs.replays == 3 and backend.runs > before  # the replays ran the compiled graphs


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("Cannot find a working triton installation")


def test_auto_falls_back_to_graphs_of_the_eager_step_when_inductor_cannot_compile(model, caplog):
    runner, graphs = runner_for(model), FakeGraphs()
    with caplog.at_level("WARNING", logger="service.engine.step_graphs"):
        runner.steps = make_steps(StepMode.COMPILED_GRAPHS, StepMode.GRAPHS, runner.decode_step, runner.buckets,
                                  runner.max_blocks, 16, runner.device, backend=failing_backend, capture=graphs)
    assert isinstance(runner.steps, CapturedSteps) and not runner.steps.compiled
    assert "could not compile the decode step (BackendCompilerFailed" in caplog.text
    assert "running graphs instead" in caplog.text
    decode_three(model, runner)


def test_on_stops_when_inductor_cannot_compile(model):
    runner = runner_for(model)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="triton"):
        make_steps(StepMode.COMPILED_GRAPHS, None, runner.decode_step, runner.buckets, runner.max_blocks, 16,
                   runner.device, backend=failing_backend, capture=FakeGraphs())


class GraphsSeen(CountingBackend):
    """CountingBackend that keeps the ops of every graph it is given."""

    def __init__(self):
        super().__init__()
        self.targets = set()

    def __call__(self, graph_module, example_inputs):
        self.targets |= {node.target for node in graph_module.graph.nodes if node.op == "call_function"}
        return super().__call__(graph_module, example_inputs)


def test_a_compiled_step_writes_the_pool_through_the_op_that_declares_it(model):
    """Traced as an indexed assignment, the K/V write made inductor copy the whole pool every step (128 ms a step
    for a 268 MB pool on CPU); inside a compiled step it goes through `chat_engine::write_kv`, which mutates the
    pool in place (bench/compiled_step_pool.py measures it). Torch's ops: what a GPU compiles."""
    runner, backend = runner_for(model), GraphsSeen()
    runner.fast.ops = None  # our CPU kernels write the pool themselves, outside any graph
    pool = runner.kv.data.data_ptr()
    runner.steps = CompiledSteps(runner.decode_step, runner.buckets, runner.device, 16, backend=backend)
    assert torch.ops.chat_engine.write_kv.default in backend.targets
    decode_three(model, runner)  # each step reads what the previous ones wrote
    assert runner.kv.data.data_ptr() == pool
