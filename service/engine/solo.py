"""One sequence through the model runner, without the scheduler: for measurement scripts and direct tests.

`Solo(runner)` takes blocks from its own block manager over the runner's pool, computes a prompt and then one
token at a time, as the engine would for a batch of one.
"""

from __future__ import annotations

import torch

from service.engine.block_manager import BlockManager
from service.engine.model_runner import ModelRunner, StepRow


class Solo:
    def __init__(self, runner: ModelRunner, blocks: BlockManager | None = None):
        self.runner = runner
        self.blocks = blocks or BlockManager(runner.kv.num_blocks, runner.block_size)
        self.table: list[int] = []
        self.length = 0  # positions computed

    def _grow(self, positions: int) -> None:
        self.blocks.grow(self.table, positions)
        self.runner.kv.zero(self.blocks.take_fresh())

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Compute `ids` after what is computed already; logits [V] at the last one."""
        self._grow(self.length + len(ids))
        logits = self.runner.run([StepRow(self.table, self.length, list(ids))])
        self.length += len(ids)
        return logits[0]

    def decode(self, token: int) -> torch.Tensor:
        """Feed one token; logits [V] after it."""
        return self.prefill([token])

    def release(self) -> None:
        self.blocks.release(self.table)
        self.length = 0
