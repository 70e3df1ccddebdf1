"""KV storage: one preallocated tensor with a fixed slot (row) per running sequence.

Shape [L, 2, S, H_kv, T, D]: L layers, keys and values, S slots (the batch limit), H_kv heads, T positions a slot
holds (the KV budget divided among the slots), D head size. A sequence writes its new K/V in place at its own
positions; joining or leaving the batch copies no other sequence's cache. Pages of a slot are only touched
once the slot is first used, so memory grows with the slots in use, up to the budget, and then stays flat.
"""

from __future__ import annotations

import heapq

import torch


class KVCache:
    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, slots: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        self.slots = slots
        self.capacity = capacity  # positions per slot: the longest prompt + answer
        self.data = torch.empty((layers, 2, slots, kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self._free = list(range(slots))  # a heap: the lowest free slot first keeps the used range compact
        self._touched = [False] * slots
        self._prepared = 0  # slots 0.._prepared-1 are known to be zeroed or in use

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """A free slot, or None. A slot used for the first time is zeroed, so that positions nobody wrote yet
        hold finite values (masked attention multiplies them by 0, and 0 * NaN would be NaN)."""
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._zero_once(slot)
        return slot

    def prepare(self, slots: int) -> None:
        """Zero slots 0..slots-1 not used yet: steps padded to a batch bucket read free slots too."""
        if slots <= self._prepared:  # every step calls this: after the first, nothing to do
            return
        for slot in range(self._prepared, slots):
            self._zero_once(slot)
        self._prepared = slots

    def _zero_once(self, slot: int) -> None:
        if not self._touched[slot]:
            self.data[:, :, slot].zero_()
            self._touched[slot] = True

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def highest_used(self) -> int:
        """1 + the highest slot in use (0 when none)."""
        used = set(range(self.slots)) - set(self._free)
        return max(used) + 1 if used else 0

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer: [S, H_kv, T, D] each (views)."""
        return self.data[index, 0], self.data[index, 1]

    def storage(self, index: int) -> torch.Tensor:
        """One layer's keys and values [2, S, H_kv, T, D] (a view), for kernels that write and read them in place."""
        return self.data[index]

    def write(self, index: int, slots: torch.Tensor, positions: torch.Tensor,
              keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [B, H_kv, N, D] of rows `slots` [B] at `positions` [B, N]."""
        both = self.data[index]  # [2, S, H_kv, T, D]
        # indexed as [B, N, 2, H_kv, D]: keys and values in one write
        both[:, slots[:, None], :, positions] = torch.stack((keys.transpose(1, 2), values.transpose(1, 2)),
                                                            dim=2).to(both.dtype)

    def copy_out(self, slot: int, length: int) -> torch.Tensor:
        """A copy of a slot's first `length` positions: [L, 2, H_kv, length, D]."""
        return self.data[:, :, slot, :, :length].clone()

    def copy_in(self, slot: int, entry: torch.Tensor, length: int) -> None:
        """Put the first `length` positions of `entry` (from copy_out) into `slot`."""
        self.data[:, :, slot, :, :length] = entry[:, :, :, :length]
