"""The model runner: computes a step's rows (prompt chunks and decode tokens) over the paged KV pool.

A row is a sequence's new tokens at positions start.. and its block table. With our own forward (Llama family,
GLM; service/models/decoder.py) a step's rows go through the model as one flattened batch of tokens, each
attending its own blocks (service/engine/step_attention.py). Any other transformers causal LM runs through its
own modules, whose layers call `GatheredCache.update`: rows are padded to the widest, K/V written to the
blocks and each row's blocks gathered for its attention (service/engine/attention.py masks what is not real);
one-token rows and longer chunks then run as two forwards. Shapes: T tokens, B rows, N tokens per row, M
blocks per table, BS block size.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from service.engine import attention
from service.engine.attention_plan import AttentionPlan
from service.engine.attention_plan import plan as plan_attention
from service.engine.block_manager import SCRATCH_BLOCK
from service.engine.kv_cache import KVPool
from service.engine.staging import to_device
from service.engine.step_attention import ChunkSpan, StepAttention, slots_of
from service.engine.step_graphs import StepMode, make_steps
from service.models import decoder
from service.models.quant.kernel_choice import choose_dense_switch, switchable

log = logging.getLogger(__name__)


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


@dataclass
class StepRow:
    """One sequence's part of a step: `ids` at positions start..start+len(ids)-1, stored in the blocks of
    `table`; `wanted`: whether the logits of its last token are needed (a chunk that ends no prompt needs none)."""

    table: list[int]
    start: int
    ids: list[int]
    wanted: bool = True


def decode_buckets(rows: int) -> list[int]:
    """The batch sizes a captured or compiled decode step runs at: powers of two below `rows`, and `rows`. A
    step of R rows runs at the smallest bucket >= R, the extra rows padding (writing to the scratch block)."""
    return sorted({1 << i for i in range(rows.bit_length()) if 1 << i < rows} | {rows})


def table_tensor(tables: list[list[int]], width: int, device) -> torch.Tensor:
    """Block tables padded with the scratch block to `width` -> [B, width]."""
    return to_device([t + [SCRATCH_BLOCK] * (width - len(t)) for t in tables], device)


class GatheredCache:
    """What a transformers attention layer sees as its cache during one forward: rows padded to N tokens."""

    is_compileable = False

    def __init__(self, kv: KVPool, slots: torch.Tensor, tables: torch.Tensor):
        self.kv = kv
        self.slots = slots  # [B, N]: where each token's K/V goes (padding: the scratch block)
        self.tables = tables  # [B, M]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key/value states [B, H_kv, N, D] -> each row's keys and values [B, H_kv, M BS, D]."""
        heads, dim = key_states.shape[1], key_states.shape[3]
        self.kv.write(layer_idx, self.slots.reshape(-1), key_states.transpose(1, 2).reshape(-1, heads, dim),
                      value_states.transpose(1, 2).reshape(-1, heads, dim))
        return self.kv.gather(layer_idx, self.tables)


class ModelRunner:
    def __init__(self, model, *, num_blocks: int, block_size: int, max_rows: int, max_context: int,
                 step_mode: StepMode = StepMode.EAGER, step_fallback: StepMode | None = None,
                 attention_plan: AttentionPlan | None = None):
        """`step_mode`: how decode-only steps run (service/engine/step_graphs.py), where our own forward runs;
        `step_fallback`: what runs instead if inductor cannot compile the step here; `attention_plan`: which
        attention kernels our forward's rows take (None: the one found for this device, which the tests
        override to run a GPU's plan on a CPU)."""
        check_supported(model)
        attention.install(model)
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.base = model.base_model  # the decoder stack, without the LM head
        self.lm_head = model.get_output_embeddings()
        # our own forward (Llama family, GLM) where we have one; the transformers modules otherwise
        self.fast = decoder.DecoderForward(model) if decoder.supports(model) else None
        self.buckets = decode_buckets(max_rows)
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
        self.kv = KVPool(layers=layers, kv_heads=kv_heads, head_dim=head_dim, num_blocks=num_blocks,
                         block_size=block_size, dtype=model.dtype, device=self.device)
        self.max_blocks = -(-max_context // block_size)  # the widest block table
        self.attention_plan = attention_plan or plan_attention(
            self.device, model.dtype, model.config.get_text_config().num_attention_heads, kv_heads, head_dim,
            ours=self.fast is not None and self.fast.ops is not None, flat=self.fast is not None)
        log.info("attention on %s%s: %s", self.device, "" if self.fast is not None else " (transformers modules)",
                 self.attention_plan.describe())
        # decode-only steps made once and replayed (--compile), or None: eager
        self.steps = None if self.fast is None else make_steps(step_mode, step_fallback, self.decode_step,
                                                               self.buckets, self.max_blocks, block_size, self.device)

    @torch.inference_mode()
    def run(self, rows: list[StepRow], fresh_blocks: list[int] = (),
            copies: list[tuple[int, int]] = ()) -> torch.Tensor:
        """Compute a step's rows; logits [W, V] at the last token of each wanted row, in row order.
        `fresh_blocks`: blocks used for the first time, zeroed first; `copies`: (source, destination) blocks
        copied then (forked answers' partly filled blocks)."""
        self.kv.zero(fresh_blocks)
        self.kv.copy(list(copies))
        if self.fast is None:
            return self._run_modules(rows)
        if self.steps is not None and all(len(r.ids) == 1 for r in rows):
            return self._run_captured(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids) > 1)  # one-token rows first
        ordered = [rows[i] for i in order]
        hidden = self._flat_forward(ordered)  # [T, hidden]
        ends = itertools.accumulate(len(r.ids) for r in ordered)  # one past each row's last token
        last = {i: end - 1 for i, end in zip(order, ends, strict=True)}
        picked = [last[i] for i, r in enumerate(rows) if r.wanted]
        if not picked:
            return hidden.new_empty((0, self.lm_head.out_features), dtype=torch.float32)
        return self.lm_head(hidden[to_device(picked, self.device)]).float()  # [W, V]

    def _flat_forward(self, rows: list[StepRow]) -> torch.Tensor:
        """rows, one-token rows first -> hidden states [T, hidden] of every token."""
        size, device = self.block_size, self.device
        ids = to_device([t for r in rows for t in r.ids], device)  # [T]
        positions = to_device([r.start + i for r in rows for i in range(len(r.ids))], device)  # [T]
        singles = [r for r in rows if len(r.ids) == 1]
        tables = table_tensor([r.table for r in singles], max((len(r.table) for r in singles), default=0), device)
        chunks, begin = [], len(singles)
        for row in rows[len(singles):]:
            n = len(row.ids)
            table = table_tensor([row.table], len(row.table), device)  # [1, M]
            mask = None if self.attention_plan.lower_right else attention.visible(positions[None, begin:begin + n],
                                                                            len(row.table) * size)  # [1, 1, N, M BS]
            chunks.append(ChunkSpan(begin, begin + n, row.start + n, table, mask))
            begin += n
        slots = to_device([r.table[p // size] * size + p % size for r in rows
                           for p in range(r.start, r.start + len(r.ids))], device)  # [T]
        step = StepAttention(self.kv, positions, tables, chunks, slots, self.fast.ops, self.attention_plan)
        return self.fast(ids, positions, step)

    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        """One token for each of R rows: ids, positions [R], block tables [R, M] -> logits [R, V]. Every shape
        comes from the tensors' and no value is read on the host, so the step can be compiled or captured."""
        slots = slots_of(tables, positions, self.block_size)
        step = StepAttention(self.kv, positions, tables, [], slots, self.fast.ops, self.attention_plan)
        return self.lm_head(self.fast(ids, positions, step)).float()  # [R, V]

    def bucket(self, rows: int) -> int:
        """The batch size a captured or compiled step of `rows` rows runs at."""
        return next(b for b in self.buckets if b >= rows)

    def _run_captured(self, rows: list[StepRow]) -> torch.Tensor:
        """A decode-only step through the compiled or captured steps, padded to its bucket (padding rows write
        position 0 of the scratch block)."""
        pad = self.bucket(len(rows)) - len(rows)
        ids = to_device([r.ids[0] for r in rows] + [0] * pad, self.device)
        positions = to_device([r.start for r in rows] + [0] * pad, self.device)
        tables = [r.table for r in rows] + [[SCRATCH_BLOCK]] * pad
        width = self.steps.table_width(max(len(t) for t in tables))
        logits = self.steps(ids, positions, table_tensor(tables, width, self.device))
        return logits[[i for i, r in enumerate(rows) if r.wanted]]

    def _run_modules(self, rows: list[StepRow]) -> torch.Tensor:
        """Through the transformers modules: one-token rows, then longer chunks, each group padded."""
        singles = [i for i, r in enumerate(rows) if len(r.ids) == 1]
        longer = [i for i, r in enumerate(rows) if len(r.ids) > 1]
        logits = {}
        for group in (singles, longer):
            if group:
                out = self._padded_forward([rows[i] for i in group])  # [B, V]
                logits.update(zip(group, out, strict=True))
        wanted = [logits[i] for i, r in enumerate(rows) if r.wanted]
        if not wanted:
            return torch.empty((0, self.lm_head.out_features), device=self.device)
        return torch.stack(wanted)

    def _padded_forward(self, rows: list[StepRow]) -> torch.Tensor:
        """Rows right-padded to the widest; logits [B, V] at each row's last token. Padding tokens write to the
        scratch block and sit at a row's last real position, where they see nothing beyond it."""
        size, device = self.block_size, self.device
        width = max(len(r.ids) for r in rows)
        ids = torch.tensor([r.ids + [r.ids[-1]] * (width - len(r.ids)) for r in rows], device=device)  # [B, N]
        positions = torch.tensor([[r.start + min(i, len(r.ids) - 1) for i in range(width)] for r in rows],
                                 device=device)  # [B, N]
        slots = torch.tensor([[r.table[(r.start + i) // size] * size + (r.start + i) % size if i < len(r.ids)
                               else SCRATCH_BLOCK * size for i in range(width)] for r in rows], device=device)
        tables = table_tensor([r.table for r in rows], max(len(r.table) for r in rows), device)  # [B, M]
        mask = attention.visible(positions, tables.shape[1] * size)  # [B, 1, N, M BS]
        cache = GatheredCache(self.kv, slots, tables)
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        last = torch.tensor([len(r.ids) - 1 for r in rows], device=device)
        hidden = out.last_hidden_state[torch.arange(len(rows), device=device), last]  # [B, hidden]
        return self.lm_head(hidden).float()
