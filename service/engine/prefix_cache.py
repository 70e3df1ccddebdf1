"""KV of recent conversations, so a next turn sent with its full history skips the shared prefix.

ChatGLM2's web demo kept `past_key_values` between turns for one user; this keeps a few for everyone.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Least-recently-used KV entries ([L, 2, H_kv, T, D], from `KVCache.copy_out`), keyed by their token ids,
    bounded in tokens."""

    def __init__(self, capacity: int):
        self.capacity = capacity  # tokens of KV kept in all
        self._entries: collections.OrderedDict[tuple[int, ...], torch.Tensor] = collections.OrderedDict()
        self._tokens = 0

    def store(self, ids: Sequence[int], entry: torch.Tensor) -> None:
        """Keep `entry` (the KV of `ids`), evicting the oldest entries past the capacity."""
        key = tuple(ids)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = entry
        self._tokens += len(key)
        while self._tokens > self.capacity and self._entries:
            old, _ = self._entries.popitem(last=False)
            self._tokens -= len(old)

    def lookup(self, prompt: Sequence[int], minimum: int) -> tuple[torch.Tensor, int] | None:
        """The entry holding the longest cached prefix of `prompt` (at least `minimum` ids, and leaving at
        least one id to compute), and how many of its positions to use; or None."""
        best_key, best = None, 0
        for key in self._entries:
            n = min(common_prefix(key, prompt), len(prompt) - 1)
            if n > best:
                best_key, best = key, n
        if best_key is None or best < minimum:
            return None
        self._entries.move_to_end(best_key)
        return self._entries[best_key], best
