"""A step's host lists (token ids, positions, block tables, slots, sampling parameters) as device tensors.

On a GPU they go through pinned host memory and a non-blocking copy, so the host queues the step's kernels
without waiting for each copy (a pageable copy makes the host wait for the GPU first); torch's caching host
allocator keeps each pinned buffer until its copy is done. Elsewhere they are made in place.
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`values` (a list, or nested lists of equal lengths) as a tensor of `dtype` on `device`."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
