"""service/engine/step_graphs.py: decode steps captured (CUDA graphs) or compiled, against the plain step.

CI has no GPU: the CUDA capture itself is replaced by a stand-in that records the step and re-runs it on
replay into the same output tensor. Everything around it (static input buffers, the choice of graph per
batch bucket and attended length, the output read back) is what these tests check.
"""

from __future__ import annotations

import pytest
import torch

from service.engine.model_runner import ModelRunner, PromptChunk
from service.engine.step_graphs import CapturedSteps, CompiledSteps, kv_lengths, wants_compiled_steps
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


def test_attended_lengths_are_powers_of_two_up_to_the_capacity():
    assert kv_lengths(2048) == [256, 512, 1024, 2048]
    assert kv_lengths(1000) == [256, 512, 1000]
    assert kv_lengths(100) == [100]


def test_compile_auto_means_graphs_on_cuda_only():
    assert wants_compiled_steps("auto", torch.device("cuda"))
    assert not wants_compiled_steps("auto", torch.device("cpu"))
    assert wants_compiled_steps("on", torch.device("cpu"))
    assert not wants_compiled_steps("off", torch.device("cuda"))


def decode_three(model, runner: ModelRunner, steps: int = 3) -> None:
    """Three sequences of different lengths decode together; every step's logits equal the plain forward."""
    seqs = [[4, 8, 15], [16, 23, 42, 7], [1, 2]]
    slots = [runner.kv.allocate() for _ in seqs]
    for slot, ids in zip(slots, seqs, strict=True):
        ids.append(int(runner.prefill([PromptChunk(slot, 0, ids)], pad_id=0)[0].argmax()))
    for _ in range(steps):
        tokens = [ids[-1] for ids in seqs]
        logits = runner.decode(tokens, [len(ids) - 1 for ids in seqs])
        for slot, ids in zip(slots, seqs, strict=True):
            torch.testing.assert_close(logits[slot], reference(model, ids), rtol=1e-5, atol=1e-5)
            ids.append(int(logits[slot].argmax()))


def test_captured_steps_replay_from_static_buffers(model):
    runner = ModelRunner(model, slots=4, capacity=512)
    graphs = FakeGraphs()
    runner.steps = CapturedSteps(runner._step, runner.buckets, 512, runner.device, capture=graphs)
    assert sorted(runner.steps.graphs) == [(rows, length) for rows in (1, 2, 4) for length in (256, 512)]
    assert (4, VOCAB) in graphs.captured and (1, VOCAB) in graphs.captured
    decode_three(model, runner)
    assert graphs.replays == 3  # every step replayed a captured graph (bucket 4, 256 positions)


def test_captured_steps_pick_the_smallest_attended_length_that_holds_the_step(model):
    runner = ModelRunner(model, slots=2, capacity=512)
    steps = CapturedSteps(runner._step, runner.buckets, 512, runner.device, capture=FakeGraphs())
    assert [steps.attended(n) for n in (1, 256, 257, 512)] == [256, 256, 512, 512]


def test_compiled_steps_equal_the_plain_step(model):
    """Dynamo traces the step per bucket (the eager backend keeps CI fast; inductor is what --compile uses)."""
    runner = ModelRunner(model, slots=4, capacity=512)
    runner.kv.prepare(4)
    runner.steps = CompiledSteps(runner._step, runner.buckets, runner.device, 64, backend="eager")
    decode_three(model, runner)
