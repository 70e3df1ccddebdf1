"""Which attention kernel each kind of row runs on this device, found once at start-up by trying them, and logged.

One-token rows (decode) and prompt chunks attend differently (service/engine/step_attention.py):

- **one-token rows**: our C++ kernel where it is built (float32 on a CPU); else, on a CPU, grouped matmuls (measured
  faster there than SDPA for one query against a padded cache); on a GPU, SDPA with each KV head's query heads
  as its queries (no `repeat_kv` copies) and a key mask: flash takes no mask, so SDPA runs its memory-efficient
  (or cuDNN) kernel, never materialising fp32 scores;
- **prompt chunks**: SDPA. In our forward on a GPU with a lower-right causal bias over the keys up to the chunk's
  end (no mask tensor), which flash attention takes; on a CPU, and through the transformers modules (whose rows
  are padded), with a boolean mask.

Which SDPA backend runs is SDPA's own choice among the enabled ones, in torch's priority order; `probe` finds it
by running the call with each backend alone, in that order, on the model's head shapes and dtype.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

log = logging.getLogger(__name__)


class Kernel(enum.Enum):
    """An attention kernel, as the log names it."""

    OURS = "our C++ kernel (rotary, K/V write and attention in one call a layer)"
    GROUPED_MATMUL = "grouped matmuls (float32 scores)"
    FLASH = "SDPA flash attention"
    EFFICIENT = "SDPA memory-efficient attention"
    CUDNN = "SDPA cuDNN attention"
    MATH = "SDPA math (scores materialised)"


BACKENDS = {SDPBackend.FLASH_ATTENTION: Kernel.FLASH, SDPBackend.EFFICIENT_ATTENTION: Kernel.EFFICIENT,
            SDPBackend.CUDNN_ATTENTION: Kernel.CUDNN, SDPBackend.MATH: Kernel.MATH}


@dataclass(frozen=True)
class AttentionPlan:
    """How a step attends: `decode` and `chunks` are the kernels that run; `sdpa_decode`: one-token rows through
    SDPA (else our kernel or grouped matmuls); `lower_right`: chunks with a lower-right causal bias over the keys
    up to their end (else a boolean mask over all their blocks)."""

    decode: Kernel
    chunks: Kernel
    sdpa_decode: bool
    lower_right: bool

    def describe(self) -> str:
        return f"one-token rows: {self.decode.value}; prompt chunks: {self.chunks.value}"


def probe(call: Callable[[], object]) -> Kernel:
    """The SDPA backend `call` runs on: the first, in torch's priority order, that runs it alone."""
    for index in torch._C._get_sdp_priority_order():
        backend = SDPBackend(index)
        if backend not in BACKENDS:
            continue
        try:
            with sdpa_kernel([backend]):
                call()
        except RuntimeError:  # "No viable backend ...": this one does not take these inputs
            continue
        return BACKENDS[backend]
    raise RuntimeError("no SDPA backend runs this model's attention here")


def plan(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, *, ours: bool,
         flat: bool = True) -> AttentionPlan:
    """The plan for a model with these head shapes on `device`; `ours`: our C++ decode kernel is loaded; `flat`:
    our own forward's flattened rows (else the transformers modules' padded ones, whose chunks need a mask)."""
    cuda = device.type == "cuda"
    lower_right = cuda and flat
    groups, keys, chunk = heads // kv_heads, 64, 16

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=device)

    q, k, v = tensor(1, kv_heads, groups, head_dim), tensor(1, kv_heads, keys, head_dim), tensor(1, kv_heads, keys,
                                                                                                  head_dim)
    key_mask = torch.ones(1, 1, 1, keys, dtype=torch.bool, device=device)
    if ours:
        decode = Kernel.OURS
    elif cuda:
        decode = probe(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask))
    else:
        decode = Kernel.GROUPED_MATMUL
    cq = tensor(1, heads, chunk, head_dim)
    if lower_right:
        chunks = probe(lambda: F.scaled_dot_product_attention(cq, k, v, attn_mask=causal_lower_right(chunk, keys),
                                                              enable_gqa=heads != kv_heads))
    else:
        mask = torch.ones(chunk, keys, dtype=torch.bool, device=device).tril(keys - chunk)[None, None]
        chunks = probe(lambda: F.scaled_dot_product_attention(cq, k, v, attn_mask=mask, enable_gqa=heads != kv_heads))
    return AttentionPlan(decode=decode, chunks=chunks, sdpa_decode=cuda and not ours, lower_right=lower_right)
