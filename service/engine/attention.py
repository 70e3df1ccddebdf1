"""Attention over the gathered blocks of the paged KV pool, for any transformers model (registered with its
AttentionInterface), and the grouped one-query attention our own step attention uses without its kernel.

The runner passes its own boolean mask [B, 1, Q, T] (True where a key may be seen). One-token decode steps of
several rows group the query heads against their KV head (no `repeat_kv` copies): on CPU in matmuls, since
SDPA's kernel is slower there for one query a row against a long padded cache (8 rows, 192 positions: 123 us
against 88 us a layer); on a GPU through SDPA, each KV head's query heads as its queries, whose
memory-efficient kernel takes the key mask without materialising scores (service/engine/attention_plan.py).
A single row and prefill chunks use SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "chat_engine"


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     scale: float, sdpa: bool = False) -> torch.Tensor:
    """query [B, H, 1, D], key/value [B, H_kv, T, D], mask [B, 1, 1, T] -> [B, H, 1, D]; with `sdpa` through
    SDPA, else matmuls."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # [B, H_kv, G, D]
    if sdpa:  # the G query heads of a KV head as its G queries; the mask broadcasts over heads and queries
        return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale).reshape(batch, heads, 1,
                                                                                                  dim)
    scores = torch.matmul(q, key.transpose(2, 3)).float() * scale  # [B, H_kv, G, T]
    scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, T] broadcasts over heads and groups
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(batch, heads, 1, dim)  # [B, H, 1, D]


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """query [B, H, Q, D], key/value [B, H_kv, T, D], boolean mask [B, 1, Q, T] or None (causal) -> [B, H, Q, D]."""
    if query.shape[2] == 1 and mask is not None and query.shape[0] > 1:
        return decode_attention(query, key, value, mask, scale, sdpa=query.device.type == "cuda")
    # SDPA: prefill chunks, and a single row's decode step, where it is the faster (12-36 us against 28-46 us a
    # layer at 64-512 positions, 2-core Xeon); no mask: a plain causal forward outside the engine
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                          is_causal=mask is None and query.shape[2] > 1,
                                          enable_gqa=key.shape[1] != query.shape[1])


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: ([B, Q, H, D], None)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend(query, key, value, attention_mask, scale).transpose(1, 2).contiguous(), None


def install(model) -> None:
    """Make `model` use this attention."""
    AttentionInterface.register(NAME, paged_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


def visible(query_positions: torch.Tensor, kv_length: int) -> torch.Tensor:
    """The mask [B, 1, Q, T]: each query sees the keys at positions up to its own."""
    keys = torch.arange(kv_length, device=query_positions.device)
    return (keys[None, None, :] <= query_positions[:, :, None])[:, None]
