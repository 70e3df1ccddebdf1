"""The decoding batch: rows of different lengths sharing one left-padded KV cache.

Rows join by `prefill` + `merge` and leave by `keep_rows`, between decode steps. Shapes:
B rows, T cached positions (left-padded), V vocabulary, L layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

HEADROOM = 128  # positions allocated ahead, so most decode steps append without copying the cache


class BufferedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers with spare room along T.

    DynamicLayer concatenates on every step, copying the whole cache; this copies only when the room runs
    out or when `merge` / `keep_rows` have put new tensors in `keys` / `values`.
    """

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def _owns(self, tensor: torch.Tensor, buffer: torch.Tensor | None, needed: int) -> bool:
        return (buffer is not None and tensor.data_ptr() == buffer.data_ptr()
                and tensor.shape[:2] == buffer.shape[:2] and needed <= buffer.shape[2])

    @staticmethod
    def _with_room(tensor: torch.Tensor, needed: int) -> torch.Tensor:
        shape = list(tensor.shape)
        shape[2] = needed + HEADROOM
        buffer = tensor.new_empty(shape)
        buffer[:, :, : tensor.shape[2]] = tensor
        return buffer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys.numel() == 0:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        length, new = self.keys.shape[2], key_states.shape[2]  # [B, H_kv, T, D]
        needed = length + new
        if not self._owns(self.keys, self._key_buffer, needed):
            self._key_buffer = self._with_room(self.keys, needed)
        if not self._owns(self.values, self._value_buffer, needed):
            self._value_buffer = self._with_room(self.values, needed)
        self._key_buffer[:, :, length:needed] = key_states
        self._value_buffer[:, :, length:needed] = value_states
        self.keys = self._key_buffer[:, :, :needed]
        self.values = self._value_buffer[:, :, :needed]
        return self.keys, self.values


def new_cache(data: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> DynamicCache:
    """An empty cache that grows BufferedLayers, or one holding `data` ([(keys, values)] per layer)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = BufferedLayer
    for index, (keys, values) in enumerate(data):
        cache.update(keys, values, index)
    return cache


def check_supported(model) -> None:
    """Refuse models whose cache is not one plain full-attention layer per decoder layer."""
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds - {"DynamicLayer"}:
        raise ValueError(f"cache layers {sorted(kinds)} (sliding window, linear attention) are not supported")


@dataclass
class KVBatch:
    """Model state for B rows: their KV cache and which cached positions are real."""

    cache: DynamicCache  # per layer keys/values: [B, H_kv, T, D]
    attention_mask: torch.Tensor  # [B, T], 1 for real positions, 0 for left padding
    next_positions: torch.Tensor  # [B], position id of each row's next token

    @property
    def size(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.attention_mask.shape[1])


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """Token ids [B, T] left-padded with `pad_id`, and the mask [B, T] of real tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def prefill(model, prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[KVBatch, torch.Tensor]:
    """Run the prompts through the model. Returns their batch state and last-position logits [B, V]."""
    device = model.device
    ids, mask = _left_pad(prompts, pad_id, device)  # [B, T]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    cache = new_cache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                use_cache=True, logits_to_keep=1)
    batch = KVBatch(cache=cache, attention_mask=mask, next_positions=mask.sum(-1))
    return batch, out.logits[:, -1, :].float()  # [B, V]


def extend(model, batch: KVBatch, suffix: Sequence[int]) -> torch.Tensor:
    """Append `suffix` to a one-row batch (a reused prefix). Returns last-position logits [1, V]."""
    device = model.device
    ids = torch.tensor([list(suffix)], dtype=torch.long, device=device)  # [1, S]
    positions = batch.next_positions[:, None] + torch.arange(len(suffix), device=device)[None, :]  # [1, S]
    batch.attention_mask = torch.cat([batch.attention_mask, torch.ones_like(ids)], dim=1)
    out = model(input_ids=ids, attention_mask=batch.attention_mask, position_ids=positions,
                cache=batch.cache, use_cache=True, logits_to_keep=1)
    batch.next_positions = batch.next_positions + len(suffix)
    return out.logits[:, -1, :].float()


def decode_one_token(model, batch: KVBatch, tokens: torch.Tensor) -> torch.Tensor:
    """Feed each row its last sampled token [B]; returns next-token logits [B, V]."""
    ones = torch.ones((batch.size, 1), dtype=batch.attention_mask.dtype, device=batch.attention_mask.device)
    batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)  # [B, T+1]
    out = model(input_ids=tokens[:, None], attention_mask=batch.attention_mask,
                position_ids=batch.next_positions[:, None], cache=batch.cache,
                use_cache=True, logits_to_keep=1)
    batch.next_positions = batch.next_positions + 1
    return out.logits[:, -1, :].float()


def _pad_left_to(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def merge(a: KVBatch | None, b: KVBatch) -> KVBatch:
    """Rows of `a` then rows of `b`, left-padded to the wider of the two."""
    if a is None or a.size == 0:
        return b
    width = max(a.width, b.width)
    for layer_a, layer_b in zip(a.cache.layers, b.cache.layers, strict=True):
        layer_a.keys = torch.cat([_pad_left_to(layer_a.keys, width, 2), _pad_left_to(layer_b.keys, width, 2)])
        layer_a.values = torch.cat(
            [_pad_left_to(layer_a.values, width, 2), _pad_left_to(layer_b.values, width, 2)])
    a.attention_mask = torch.cat([_pad_left_to(a.attention_mask, width, 1),
                                  _pad_left_to(b.attention_mask, width, 1)])
    a.next_positions = torch.cat([a.next_positions, b.next_positions])
    return a


def keep_rows(batch: KVBatch, rows: Sequence[int]) -> KVBatch | None:
    """Only `rows` stay; columns that are padding in every remaining row are dropped. None when empty."""
    if not rows:
        return None
    index = torch.tensor(list(rows), dtype=torch.long, device=batch.attention_mask.device)
    mask = batch.attention_mask.index_select(0, index)  # [B', T]
    first = int((mask.sum(0) > 0).nonzero()[0])  # leading columns that are padding everywhere
    for layer in batch.cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, first:]
        layer.values = layer.values.index_select(0, index)[:, :, first:]
    batch.attention_mask = mask[:, first:]
    batch.next_positions = batch.next_positions.index_select(0, index)
    return batch


def slice_row(batch: KVBatch, row: int, length: int) -> KVBatch:
    """A one-row copy of `row`'s first `length` real positions, to keep as a reusable prefix."""
    start = batch.width - int(batch.attention_mask[row].sum())  # first real column
    cache = new_cache([
        (layer.keys[row:row + 1, :, start:start + length].clone(),
         layer.values[row:row + 1, :, start:start + length].clone())
        for layer in batch.cache.layers
    ])
    mask = torch.ones((1, length), dtype=batch.attention_mask.dtype, device=batch.attention_mask.device)
    positions = torch.tensor([length], dtype=batch.next_positions.dtype, device=batch.next_positions.device)
    return KVBatch(cache=cache, attention_mask=mask, next_positions=positions)


def cached_tokens(batch: KVBatch | None) -> int:
    """KV positions held, padding included: what the batch costs in memory."""
    return 0 if batch is None else batch.size * batch.width
