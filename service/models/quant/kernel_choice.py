"""Where a packed layer switches to its dense copy, measured per layer shape on this machine.

The packed int4/int8 CPU kernels work through the input rows one after another, so their time grows with the
rows; a dense matmul grows much more slowly (bfloat16 on AMX hardly at all). Where the two cross depends on the
CPU: measured on an AMX Xeon, a 3072x576 layer at 16 rows took 0.36 ms packed against 0.19 ms dense bfloat16,
and the tied 49152x576 LM head 6.3 ms int8 against 2.2 ms. So the runner measures each distinct layer shape
once at start-up, at the row counts it runs, and sets `dense_from_rows` on every layer of that shape.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from service.models.quant.int4 import DenseCopy

log = logging.getLogger(__name__)

REPEATS = 3
MEASURED_ROWS = 64  # larger batches are not measured: there the dense copy wins by far (a prefill's case)


def switchable(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The layers that hold both packed weights and a dense copy (each once)."""
    found: dict[int, nn.Module] = {}
    for module in modules:
        if isinstance(module, DenseCopy) and module.has_dense:
            found.setdefault(id(module), module)
    return list(found.values())


def _best_ms(fn, repeats: int = REPEATS) -> float:
    """The fastest of `repeats` runs (the first doubles as warm-up; the fastest is the least disturbed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


@torch.inference_mode()
def dense_switch(layers: Sequence[nn.Module], rows: Sequence[int]) -> int:
    """The fewest rows (of `rows`) from which the dense copies are faster at every larger count, timed over one
    pass through all of `layers` (same shape, different weights), as a decode step reads them: from memory,
    not from a cache warmed by the same weight. Counts are tried from the largest down and the search stops
    at the first the packed kernel wins. Past MEASURED_ROWS the dense copies are taken as faster."""
    first = layers[0]
    switch = None
    for count in sorted((r for r in rows if r <= MEASURED_ROWS), reverse=True):
        x = torch.randn(count, first.in_features, dtype=torch.float32)
        packed = _best_ms(lambda x=x: [layer.packed_matmul(x) for layer in layers])
        dense = _best_ms(lambda x=x: [layer.dense_matmul(x) for layer in layers])
        if packed <= dense:
            break
        switch = count
    return switch if switch is not None else min(max(rows), MEASURED_ROWS) + 1


def choose_dense_switch(modules: Iterable[nn.Module], rows: Sequence[int]) -> dict[tuple, int]:
    """Measure each distinct shape among `modules`' switchable layers and set `dense_from_rows` on all of them.
    Returns {(kind, out, in, dense dtype): switch}."""
    by_shape: dict[tuple, list[nn.Module]] = {}
    for layer in switchable(modules):
        key = (type(layer).__name__, layer.out_features, layer.in_features, str(layer.dense_dtype))
        by_shape.setdefault(key, []).append(layer)
    started = time.perf_counter()
    chosen = {}
    for key, group in by_shape.items():
        chosen[key] = dense_switch(group, rows)
        for layer in group:
            layer.dense_from_rows = chosen[key]
    if chosen:
        log.info("dense copies take over from (measured in %.2f s): %s", time.perf_counter() - started,
                 ", ".join(f"{kind} {out}x{inp} x{len(by_shape[(kind, out, inp, dt)])} at {switch} rows"
                           for (kind, out, inp, dt), switch in chosen.items()))
    return chosen
