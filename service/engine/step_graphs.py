"""Decode steps made once and replayed: CUDA graphs on a GPU, `torch.compile` on CPU (`--compile`).

A decode step's shapes are fixed by two numbers: its batch bucket (service/engine/model_runner.py pads a step
to one, padding rows writing to the scratch block) and the width of its block tables. On CUDA,
`CapturedSteps` captures one graph per (bucket, table width) before the server reports SERVING, as nano-vllm's
`capture_cudagraph` does: ids, positions and block tables are copied into static buffers, the graph replays
every kernel of the step with no Python and no host sync, and the logits land in a static output. Table widths
are powers of two from SMALLEST_KV_LENGTH positions up to the longest context, so a step gathers at most twice
the blocks it needs. On CPU, `CompiledSteps` compiles the step per bucket with inductor (its table width
dynamic) and warms each bucket up, so the compile cost is paid at start-up; inductor keeps its artifacts on
disk and a restart reuses them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

# step(ids [R], positions [R], block tables [R, M]) -> logits [R, V]: one decode step of R rows
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# capture(run) -> (replay, output): record `run` once, then `replay()` recomputes `output` in place
Capture = Callable[[Callable[[], torch.Tensor], object], tuple[Callable[[], None], torch.Tensor, object]]

SMALLEST_KV_LENGTH = 256


def wants_compiled_steps(mode: str, device: torch.device) -> bool:
    """`--compile auto|on|off` on `device`: auto captures CUDA graphs on a GPU and compiles nothing on CPU, where
    compiling costs minutes per batch bucket and was measured not to pay (docs/engine.md, Compiled steps)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def table_widths(max_blocks: int, block_size: int) -> list[int]:
    """Block-table widths graphs are captured at: powers of two from SMALLEST_KV_LENGTH positions, and the widest
    table (the longest context)."""
    widths, width = [], max(1, SMALLEST_KV_LENGTH // block_size)
    while width < max_blocks:
        widths.append(width)
        width *= 2
    return [*widths, max_blocks]


def capture_cuda_graph(run: Callable[[], torch.Tensor], pool) -> tuple[Callable[[], None], torch.Tensor, object]:
    """`run` as a CUDA graph in memory pool `pool` (None: a new one); returns (replay, output, pool)."""
    run()  # warm-up outside the graph: lazy initialisation and allocator caching happen here
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = run()
    return graph.replay, output, graph.pool()


class CapturedSteps:
    """One captured decode step per (batch bucket, table width), replayed from static buffers."""

    @torch.inference_mode()
    def __init__(self, step: Step, buckets: Sequence[int], max_blocks: int, block_size: int, device: torch.device,
                 capture: Capture = capture_cuda_graph):
        largest = max(buckets)
        self.widths = table_widths(max_blocks, block_size)
        self.ids = torch.zeros(largest, dtype=torch.long, device=device)  # [R], static
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)  # [R], static
        self.tables = torch.zeros((largest, max(self.widths)), dtype=torch.long, device=device)  # [R, M], static
        self.graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        started, pool = time.perf_counter(), None
        for rows in sorted(buckets, reverse=True):  # largest first: smaller graphs reuse its pool's memory
            for width in reversed(self.widths):
                def run(rows=rows, width=width) -> torch.Tensor:
                    return step(self.ids[:rows], self.positions[:rows], self.tables[:rows, :width])

                replay, output, pool = capture(run, pool)
                self.graphs[rows, width] = replay, output
        log.info("captured %d decode graphs (batch buckets %s x table widths %s) in %.1f s", len(self.graphs),
                 sorted(buckets), self.widths, time.perf_counter() - started)

    def table_width(self, blocks: int) -> int:
        """The captured table width a step whose longest table has `blocks` blocks runs at."""
        return next(width for width in self.widths if width >= blocks)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """ids, positions [R], tables [R, M] (R a bucket, M a captured width) -> logits [R, V] (a view of the
        graph's static output: read it before the next step)."""
        rows, width = tables.shape
        self.ids[:rows].copy_(ids, non_blocking=True)
        self.positions[:rows].copy_(positions, non_blocking=True)
        self.tables[:rows, :width].copy_(tables, non_blocking=True)
        replay, output = self.graphs[rows, width]
        replay()
        return output


class CompiledSteps:
    """The decode step compiled by inductor, one compiled callable per batch bucket (kept apart so that one
    bucket's recompile never evicts another's), each warmed up here."""

    @torch.inference_mode()  # as the steps will run: a change of grad mode would compile them again
    def __init__(self, step: Step, buckets: Sequence[int], device: torch.device, block_size: int,
                 backend: str = "inductor"):
        self.steps = {rows: torch.compile(step, dynamic=None, backend=backend) for rows in buckets}
        self.smallest = max(1, SMALLEST_KV_LENGTH // block_size)
        started = time.perf_counter()
        for rows in buckets:
            ids = torch.zeros(rows, dtype=torch.long, device=device)
            # two table widths: the second makes dynamo compile the width as dynamic, once, now (every row in the
            # scratch block, position 0)
            for width in (self.smallest, 2 * self.smallest):
                self.steps[rows](ids, torch.zeros_like(ids), torch.zeros((rows, width), dtype=torch.long,
                                                                         device=device))
        log.info("compiled the decode step for batch buckets %s in %.1f s", list(buckets),
                 time.perf_counter() - started)

    def table_width(self, blocks: int) -> int:
        """Widths are rounded up to a power of two blocks (at least SMALLEST_KV_LENGTH positions): few shapes."""
        width = self.smallest
        while width < blocks:
            width *= 2
        return width

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        return self.steps[ids.shape[0]](ids, positions, tables)
