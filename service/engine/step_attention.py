"""One step's attention over the paged KV pool, for our own forward (service/models/decoder.py).

A step's T tokens run through the model as one flattened batch: first the one-token rows (decode tokens, and
one-token prompt chunks), then each prompt chunk's tokens. Every token writes its K/V at its own slot and
attends only its own sequence's blocks, up to its own position: nothing is padded to the longest row or the
widest chunk. One-token rows take our C++ kernel, one call per layer for rotary, the K/V write and attention
over block tables, where it is built (float32 on CPU); else, and for prompt chunks, torch ops over the
sequence's gathered blocks, as the step's AttentionPlan says (service/engine/attention_plan.py: grouped matmuls
or SDPA for one-token rows, SDPA with a mask or a lower-right causal bias for chunks). Shapes: T tokens, S
one-token rows, M blocks a table row holds, BS block size, G query heads per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from service.engine import attention
from service.engine.attention_plan import AttentionPlan
from service.engine.kv_cache import KVPool


@dataclass
class ChunkSpan:
    """A prompt chunk's tokens begin..end-1 of the step, the last at position `keys` - 1 of its sequence."""

    begin: int
    end: int
    keys: int  # the positions its last token sees: its sequence's, up to its own
    table: torch.Tensor  # [1, M]
    mask: torch.Tensor | None  # [1, 1, N, M * BS]: each token sees its sequence's positions up to its own; None
    # with a lower-right causal bias instead


def slots_of(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Pool slots (block * BS + offset) of positions [S] in block tables [S, M] -> [S] (no host sync)."""
    blocks = tables.gather(1, (positions // block_size)[:, None])[:, 0]
    return blocks * block_size + positions % block_size


class StepAttention:
    """What our forward calls in each layer after its qkv matmul: `(block, qkv [T, W], cos, sin [T, R], rotate,
    pairs) -> [T, H D]`."""

    def __init__(self, pool: KVPool, positions: torch.Tensor, tables: torch.Tensor, chunks: list[ChunkSpan],
                 slots: torch.Tensor, ops, plan: AttentionPlan):
        """positions [T]; tables [S, M] of the S one-token rows; `slots` [T] where each token's K/V goes;
        `ops`: our kernels, or None; `plan`: which kernels the rows without ours take."""
        self.pool = pool
        self.plan = plan
        self.positions = positions
        self.tables = tables
        self.singles = tables.shape[0]
        self.chunks = chunks
        self.slots = slots
        self.ops = ops
        if self.singles and ops is None:  # [S, 1, 1, M * BS]
            self.single_mask = attention.visible(positions[:self.singles, None], tables.shape[1] * pool.block_size)

    def __call__(self, block, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate, pairs: int):
        out = qkv.new_empty((qkv.shape[0], block.heads * block.head_dim))
        s = self.singles
        if s and self.ops is not None:
            out[:s] = self.ops.rope_store_attend(qkv[:s], cos[:s], sin[:s], self.pool.storage(block.index),
                                                 self.tables, self.positions[:s], block.heads, block.scale, pairs)
        elif s:
            q, k, v = split_heads(block, qkv[:s], rotate, cos[:s], sin[:s])
            self.pool.write(block.index, self.slots[:s], k, v)
            keys, values = self.pool.gather(block.index, self.tables)  # [S, H_kv, M BS, D]
            y = attention.decode_attention(q[:, :, None], keys, values, self.single_mask, block.scale,
                                           sdpa=self.plan.sdpa_decode)
            out[:s] = y.reshape(s, -1)
        for chunk in self.chunks:
            a, b = chunk.begin, chunk.end
            q, k, v = split_heads(block, qkv[a:b], rotate, cos[a:b], sin[a:b])
            self.pool.write(block.index, self.slots[a:b], k, v)
            keys, values = self.pool.gather(block.index, chunk.table)  # [1, H_kv, M BS, D]
            if chunk.mask is None:  # lower-right causal over the keys up to the chunk's end: flash takes it
                keys, values = keys[:, :, :chunk.keys], values[:, :, :chunk.keys]
                mask = causal_lower_right(b - a, chunk.keys)
            else:
                mask = chunk.mask
            y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask,
                                               scale=block.scale, enable_gqa=block.kv_heads != block.heads)
            out[a:b] = y[0].transpose(0, 1).reshape(b - a, -1)  # [N, H D]
        return out


def split_heads(block, qkv: torch.Tensor, rotate, cos: torch.Tensor, sin: torch.Tensor):
    """qkv [N, (H + 2 H_kv) D], cos/sin [N, R] -> q [N, H, D], k and v [N, H_kv, D], q and k rotated."""
    n = qkv.shape[0]
    heads = block.heads + block.kv_heads
    qk, v = qkv.split([heads * block.head_dim, block.kv_heads * block.head_dim], dim=-1)
    qk = rotate(qk.view(n, heads, block.head_dim), cos[:, None], sin[:, None])  # q and k at once
    return qk[:, :block.heads], qk[:, block.heads:], v.view(n, block.kv_heads, block.head_dim)
