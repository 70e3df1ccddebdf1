"""The model runner: computes prefill chunks and decode steps over the slot KV cache.

Any transformers causal LM runs here: its layers call `SlotCache.update`, which writes each row's new K/V in
place at the row's own positions and hands back the cached keys/values the step attends to; the attention
(service/engine/attention.py) masks what is not real. Shapes: B rows, N new tokens per row, T attended positions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from service.engine import attention
from service.engine.kv_cache import KVCache
from service.engine.step_graphs import CapturedSteps, CompiledSteps
from service.models import decoder
from service.models.quant.kernel_choice import choose_dense_switch, switchable

log = logging.getLogger(__name__)

KV_LENGTH_STEP = 64  # attended lengths are rounded up to this, so steps reuse a few shapes


def check_supported(model) -> None:
    """Refuse models whose cache is not one plain full-attention layer per decoder layer."""
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds - {"DynamicLayer"}:
        raise ValueError(f"cache layers {sorted(kinds)} (sliding window, linear attention) are not supported")


def cache_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head size) of a transformers config."""
    config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class SlotCache:
    """What a transformers attention layer sees as its cache during one forward."""

    is_compileable = False

    def __init__(self, kv: KVCache, slots: torch.Tensor, positions: torch.Tensor, kv_length: int, rows: int | None):
        self.kv = kv
        self.slots = slots  # [B]
        self.positions = positions  # [B, N]
        self.kv_length = kv_length
        self.rows = rows  # decode: the rows are slots 0..rows-1, read as a view; prefill: gathered

    def decode_storage(self, layer_idx: int) -> torch.Tensor:
        """This layer's keys and values [2, S, H_kv, T, D], for a one-token step that writes its rows' K/V at
        (`slots`, `positions`) itself (service/models/decoder.py)."""
        return self.kv.storage(layer_idx)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kv.write(layer_idx, self.slots, self.positions, key_states, value_states)
        keys, values = self.kv.layer(layer_idx)
        if self.rows is not None:
            return keys[:self.rows, :, :self.kv_length], values[:self.rows, :, :self.kv_length]
        return keys[self.slots, :, :self.kv_length], values[self.slots, :, :self.kv_length]


@dataclass
class PromptChunk:
    """Prompt tokens of one sequence to compute: `ids` at positions start..start+len(ids)-1 of `slot`."""

    slot: int
    start: int
    ids: list[int]


def _round_up(value: int, step: int, limit: int) -> int:
    return min(limit, -(-value // step) * step)


def decode_buckets(slots: int) -> list[int]:
    """The batch sizes a decode step runs at: powers of two below the slot count, and the slot count. A step of
    R rows runs at the smallest bucket >= R, the extra rows padding, so steps reuse a few shapes (what compiled
    or captured steps need, and what the kernel choice was measured at)."""
    return sorted({1 << i for i in range(slots.bit_length()) if 1 << i < slots} | {slots})


class ModelRunner:
    def __init__(self, model, *, slots: int, capacity: int, compile_steps: bool = False):
        check_supported(model)
        attention.install(model)
        self.model = model
        self.device = model.device
        self.base = model.base_model  # the decoder stack, without the LM head
        self.lm_head = model.get_output_embeddings()
        # our own forward (Llama family, GLM) where we have one; the transformers modules otherwise
        self.fast = decoder.DecoderForward(model) if decoder.supports(model) else None
        self.buckets = decode_buckets(slots)
        # packed layers with a dense copy switch to it where it is faster here, per shape and batch size
        used = [*self.fast.modules(), self.lm_head] if self.fast is not None else list(model.modules())
        for layer in switchable(used):
            layer.block_dense()  # oneDNN's layout: the same results, faster
        if self.fast is not None:  # the model's own unfused layers do not run: their dense copies are only memory
            running = {id(layer) for layer in used}
            for layer in switchable(model.modules()):
                if id(layer) not in running:
                    layer.drop_dense()
        choose_dense_switch(used, self.buckets)
        layers, kv_heads, head_dim = cache_shape(model.config)
        self.kv = KVCache(layers=layers, kv_heads=kv_heads, head_dim=head_dim, slots=slots, capacity=capacity,
                          dtype=model.dtype, device=self.device)
        self.steps = self._step  # the decode step: as it is, or made once and replayed (--compile)
        if compile_steps:
            self.kv.prepare(slots)  # captured or warmed-up steps read every slot
            if self.device.type == "cuda":
                self.steps = CapturedSteps(self._step, self.buckets, capacity, self.device)
            else:
                self.steps = CompiledSteps(self._step, self.buckets, self.device, KV_LENGTH_STEP)

    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor, cache: SlotCache) -> torch.Tensor:
        """ids, positions [B, N] -> last hidden states [B, N, hidden]."""
        mask = attention.visible(positions, cache.kv_length)  # [B, 1, N, T]
        if self.fast is not None:
            return self.fast(ids, positions, cache, mask, attention.attend)
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        return out.last_hidden_state

    @torch.inference_mode()
    def prefill(self, chunks: list[PromptChunk], pad_id: int) -> torch.Tensor:
        """Compute the chunks (right-padded to the longest); logits [B, V] at each chunk's last token."""
        width = max(len(c.ids) for c in chunks)
        ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
        positions = torch.empty((len(chunks), width), dtype=torch.long)
        for row, chunk in enumerate(chunks):
            ids[row, :len(chunk.ids)] = torch.tensor(chunk.ids)
            # padding tokens land past the chunk (clamped into the slot), where no real key is read before
            # the sequence's own later tokens overwrite them
            positions[row] = torch.arange(chunk.start, chunk.start + width).clamp(max=self.kv.capacity - 1)
        kv_length = _round_up(int(positions.max()) + 1, KV_LENGTH_STEP, self.kv.capacity)
        slots = torch.tensor([c.slot for c in chunks], device=self.device)
        positions = positions.to(self.device)
        cache = SlotCache(self.kv, slots, positions, kv_length, rows=None)
        hidden = self._hidden(ids.to(self.device), positions, cache)  # [B, N, hidden]
        last = torch.tensor([len(c.ids) - 1 for c in chunks], device=self.device)
        hidden = hidden[torch.arange(len(chunks), device=self.device), last]  # [B, hidden]
        return self.lm_head(hidden).float()  # [B, V]

    def bucket(self, rows: int) -> int:
        """The batch size a step of `rows` rows runs at."""
        return next(b for b in self.buckets if b >= rows)

    def _step(self, ids: torch.Tensor, where: torch.Tensor, kv_length: int) -> torch.Tensor:
        """ids, positions [R, 1] of slots 0..R-1, attending `kv_length` positions -> logits [R, V]. Every
        shape comes from R and kv_length: no host sync, so it can be compiled or captured."""
        rows = ids.shape[0]
        slots = torch.arange(rows, device=ids.device)
        cache = SlotCache(self.kv, slots, where, kv_length, rows=rows)
        hidden = self._hidden(ids, where, cache)  # [R, 1, hidden]
        return self.lm_head(hidden[:, -1]).float()  # [R, V]

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of the slots 0..R-1: token ids and positions [R] -> logits [R', V], R' = the bucket
        of R (rows past R are padding, at position 0 of their free slot). Slots not decoding pass a harmless
        position (one their owner will overwrite, or any in a free slot). Shapes come from the host-side lists,
        so the step syncs with the device only to read its logits."""
        rows = self.bucket(len(tokens))
        pad = rows - len(tokens)
        self.kv.prepare(rows)
        kv_length = _round_up(max(positions) + 1, KV_LENGTH_STEP, self.kv.capacity)
        ids = torch.tensor(tokens + tokens[-1:] * pad, device=self.device)[:, None]  # [R', 1]
        where = torch.tensor(positions + [0] * pad, device=self.device)[:, None]  # [R', 1]
        return self.steps(ids, where, kv_length)  # [R', V]
