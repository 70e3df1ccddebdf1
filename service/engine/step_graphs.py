"""Decode steps made once and replayed (`--compile`): CUDA graphs of the step, compiled by inductor first or
not, on a GPU; inductor alone on a CPU.

A decode step's shapes are fixed by two numbers: its batch bucket (service/engine/model_runner.py pads a step
to one, padding rows writing to the scratch block) and the width of its block tables. On CUDA,
`CapturedSteps` captures one graph per (bucket, table width) before the server reports SERVING, as nano-vllm's
`capture_cudagraph` does: ids, positions and block tables are copied into static buffers, the graph replays
every kernel of the step with no Python and no host sync, and the logits land in a static output. Table widths
are powers of two from SMALLEST_KV_LENGTH positions up to the longest context, so a step gathers at most twice
the blocks it needs. With COMPILED_GRAPHS the step is first compiled by inductor once, its batch and table
width dynamic (fusing the ~35 small kernels a layer runs eager: norms, rotary, the K/V write), then captured per
(bucket, width), as `mode="reduce-overhead"` does. On CPU, `CompiledSteps` compiles the step per bucket with
inductor (its table width dynamic) and warms each bucket up, so the compile cost is paid at start-up; inductor
keeps its artifacts on disk and a restart reuses them.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch._dynamo.exc import TorchDynamoException

log = logging.getLogger(__name__)

# step(ids [R], positions [R], block tables [R, M]) -> logits [R, V]: one decode step of R rows
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# capture(run) -> (replay, output): record `run` once, then `replay()` recomputes `output` in place
Capture = Callable[[Callable[[], torch.Tensor], object], tuple[Callable[[], None], torch.Tensor, object]]

SMALLEST_KV_LENGTH = 256


class StepMode(enum.Enum):
    """How decode-only steps run."""

    EAGER = "eager"  # op by op, as every other step
    COMPILED = "compiled"  # inductor, one compiled step per batch bucket (CPU)
    GRAPHS = "graphs"  # the eager step captured as CUDA graphs per (bucket, table width)
    COMPILED_GRAPHS = "compiled graphs"  # inductor once (batch and width dynamic), then captured as CUDA graphs


def step_modes(mode: str, device: torch.device) -> tuple[StepMode, StepMode | None]:
    """`--compile auto|on|graphs|off` on `device` -> (the mode to run, the mode to run instead if inductor cannot
    compile the step here, or None: then start-up fails). On a GPU `auto` compiles and captures, falling back to
    graphs alone; on a CPU it compiles nothing: there compiling costs minutes per batch bucket and was measured
    not to pay (docs/engine.md, Compiled steps). `on` compiles on either, with no fallback; `graphs` needs CUDA."""
    cuda = device.type == "cuda"
    if mode == "off" or (mode == "auto" and not cuda):
        return StepMode.EAGER, None
    if mode == "graphs":
        if not cuda:
            raise ValueError(f"--compile graphs: CUDA graphs need a CUDA device, and this one is {device}; use "
                             "--compile on (inductor) or off")
        return StepMode.GRAPHS, None
    if not cuda:
        return StepMode.COMPILED, None
    return StepMode.COMPILED_GRAPHS, StepMode.GRAPHS if mode == "auto" else None


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
    """One captured decode step per (batch bucket, table width), replayed from static buffers; with
    `compile_backend`, the step is compiled by it (inductor) once, its batch and width dynamic, before it is
    captured."""

    @torch.inference_mode()
    def __init__(self, step: Step, buckets: Sequence[int], max_blocks: int, block_size: int, device: torch.device,
                 capture: Capture = capture_cuda_graph, compile_backend: str | Callable | None = None):
        largest = max(buckets)
        self.compiled = compile_backend is not None
        # one compiled step for every bucket and width (both dynamic): one compile at start-up, not one a bucket
        compiled = torch.compile(step, dynamic=True, backend=compile_backend) if self.compiled else step
        self.widths = table_widths(max_blocks, block_size)
        self.ids = torch.zeros(largest, dtype=torch.long, device=device)  # [R], static
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)  # [R], static
        self.tables = torch.zeros((largest, max(self.widths)), dtype=torch.long, device=device)  # [R, M], static
        self.graphs: dict[tuple[int, int], tuple[Callable[[], None], torch.Tensor]] = {}
        started, pool = time.perf_counter(), None
        for rows in sorted(buckets, reverse=True):  # largest first: smaller graphs reuse its pool's memory
            for width in reversed(self.widths):
                def run(rows=rows, width=width) -> torch.Tensor:
                    return compiled(self.ids[:rows], self.positions[:rows], self.tables[:rows, :width])

                replay, output, pool = capture(run, pool)
                self.graphs[rows, width] = replay, output
        log.info("captured %d decode graphs%s (batch buckets %s x table widths %s) in %.1f s", len(self.graphs),
                 f" of the step compiled by {getattr(compile_backend, '__name__', compile_backend)}" if self.compiled
                 else " of the eager step",
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
                 backend: str | Callable = "inductor"):
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


def make_steps(mode: StepMode, fallback: StepMode | None, step: Step, buckets: Sequence[int], max_blocks: int,
               block_size: int, device: torch.device, *, backend: str | Callable = "inductor",
               capture: Capture = capture_cuda_graph) -> CapturedSteps | CompiledSteps | None:
    """The decode steps `mode` asks for (None: eager), compiled by `backend`. Where it cannot compile the step
    here (dynamo or its backend fails: no triton, an unsupported op) and there is a `fallback`, that runs
    instead, and the log says why; without one the error stops the start-up. `capture`: the tests' seam."""
    if mode is StepMode.EAGER:
        return None
    if mode is StepMode.COMPILED:
        return CompiledSteps(step, buckets, device, block_size, backend=backend)
    try:
        return CapturedSteps(step, buckets, max_blocks, block_size, device, capture=capture,
                             compile_backend=backend if mode is StepMode.COMPILED_GRAPHS else None)
    except TorchDynamoException as err:
        if fallback is None:
            raise
        log.warning("could not compile the decode step (%s: %s); running %s instead", type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "", fallback.value)
        return make_steps(fallback, None, step, buckets, max_blocks, block_size, device, capture=capture)
