"""Decode steps made once and replayed: CUDA graphs on a GPU, `torch.compile` on CPU (`--compile`).

A decode step's shapes are fixed by two numbers: its batch bucket (service/engine/model_runner.py pads a step
to one) and how many KV positions it attends. On CUDA, `CapturedSteps` captures one graph per (bucket,
attended length) before the server reports SERVING, as nano-vllm's model runner does: inputs are copied into
static buffers, the graph replays every kernel of the step with no Python and no host sync, and the logits
land in a static output. Attended lengths are powers of two up to the slot's capacity, so a step attends at
most twice the positions it needs. On CPU, `CompiledSteps` compiles the step per bucket with inductor
(its attended length dynamic) and warms each bucket up, so the compile cost is paid at start-up; inductor
keeps its artifacts on disk and a restart reuses them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

# step(ids [R, 1], positions [R, 1], kv_length) -> logits [R, V]: one decode step over slots 0..R-1
Step = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
# capture(run) -> (replay, output): record `run` once, then `replay()` recomputes `output` in place
Capture = Callable[[Callable[[], torch.Tensor], object], tuple[Callable[[], None], torch.Tensor, object]]

SMALLEST_KV_LENGTH = 256


def wants_compiled_steps(mode: str, device: torch.device) -> bool:
    """`--compile auto|on|off` on `device`: auto captures CUDA graphs on a GPU and compiles nothing on CPU, where
    compiling costs minutes per batch bucket and was measured not to pay (docs/engine.md, Compiled steps)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def kv_lengths(capacity: int) -> list[int]:
    """Attended lengths graphs are captured at: powers of two from SMALLEST_KV_LENGTH, and the capacity."""
    lengths, length = [], SMALLEST_KV_LENGTH
    while length < capacity:
        lengths.append(length)
        length *= 2
    return [*lengths, capacity]


def capture_cuda_graph(run: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor, object]:
    """`run` as a CUDA graph in memory pool `pool` (None: a new one); returns (replay, output, pool)."""
    run()  # warm-up outside the graph: lazy initialisation and allocator caching happen here
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = run()
    return graph.replay, output, graph.pool()


class CapturedSteps:
    """One captured decode step per (batch bucket, attended length), replayed from static buffers."""

    @torch.inference_mode()
    def __init__(self, step: Step, buckets: Sequence[int], capacity: int, device: torch.device,
                 capture: Capture = capture_cuda_graph):
        largest = max(buckets)
        self.ids = torch.zeros((largest, 1), dtype=torch.long, device=device)  # [R, 1], static
        self.positions = torch.zeros((largest, 1), dtype=torch.long, device=device)  # [R, 1], static
        self.kv_lengths = kv_lengths(capacity)
        self.graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        started, pool = time.perf_counter(), None
        for rows in sorted(buckets, reverse=True):  # largest first: smaller graphs reuse its pool's memory
            for kv_length in reversed(self.kv_lengths):
                def run(rows=rows, kv_length=kv_length) -> torch.Tensor:
                    return step(self.ids[:rows], self.positions[:rows], kv_length)

                replay, output, pool = capture(run, pool)
                self.graphs[rows, kv_length] = replay, output
        log.info("captured %d decode graphs (batch buckets %s x attended lengths %s) in %.1f s", len(self.graphs),
                 sorted(buckets), self.kv_lengths, time.perf_counter() - started)

    def attended(self, kv_length: int) -> int:
        """The captured attended length a step needing `kv_length` positions runs at."""
        return next(length for length in self.kv_lengths if length >= kv_length)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, kv_length: int) -> torch.Tensor:
        """ids, positions [R, 1] (R a bucket) -> logits [R, V] (a view of the graph's static output: read it
        before the next step)."""
        rows = ids.shape[0]
        self.ids[:rows].copy_(ids, non_blocking=True)
        self.positions[:rows].copy_(positions, non_blocking=True)
        replay, output = self.graphs[rows, self.attended(kv_length)]
        replay()
        return output


class CompiledSteps:
    """The decode step compiled by inductor, one compiled callable per batch bucket (kept apart so that one
    bucket's recompile never evicts another's), each warmed up here."""

    @torch.inference_mode()  # as the steps will run: a change of grad mode would compile them again
    def __init__(self, step: Step, buckets: Sequence[int], device: torch.device, warm_positions: int,
                 backend: str = "inductor"):
        self.steps = {rows: torch.compile(step, dynamic=None, backend=backend) for rows in buckets}
        started = time.perf_counter()
        for rows in buckets:
            ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
            # two attended lengths: the second makes dynamo compile the length as dynamic, once, now
            for kv_length in (warm_positions, 2 * warm_positions):
                self.steps[rows](ids, torch.zeros_like(ids), kv_length)
        log.info("compiled the decode step for batch buckets %s in %.1f s", list(buckets),
                 time.perf_counter() - started)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, kv_length: int) -> torch.Tensor:
        return self.steps[ids.shape[0]](ids, positions, kv_length)
