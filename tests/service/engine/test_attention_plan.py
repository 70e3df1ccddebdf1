"""service/engine/attention_plan.py: which attention kernel each kind of row gets, found by trying them.

The GPU's choices cannot be made here (CI has no GPU); what is checked is the CPU's plan, that the probe names
the backend SDPA itself would pick (the first that runs, in torch's priority order), and, in
test_model_runner.py, that a GPU's plan computes what the CPU's does."""

from __future__ import annotations

import pytest
import torch

from service.engine import attention
from service.engine.attention_plan import Kernel, plan, probe


def test_on_a_cpu_decode_takes_our_kernel_or_grouped_matmuls_and_chunks_sdpa_with_a_mask():
    cpu = torch.device("cpu")
    ours = plan(cpu, torch.float32, heads=9, kv_heads=3, head_dim=64, ours=True)
    assert (ours.decode, ours.sdpa_decode, ours.lower_right) == (Kernel.OURS, False, False)
    torchs = plan(cpu, torch.float32, heads=9, kv_heads=3, head_dim=64, ours=False)
    assert torchs.decode == Kernel.GROUPED_MATMUL
    assert torchs.chunks == Kernel.FLASH  # torch's CPU flash kernel takes a boolean mask and grouped heads
    assert torchs.describe() == ("one-token rows: grouped matmuls (float32 scores); prompt chunks: SDPA flash "
                                 "attention")


def test_the_probe_names_the_first_backend_in_torchs_order_that_runs_the_call():
    def math_only():  # stands in for a call that only SDPA's math backend takes
        if not torch.backends.cuda.math_sdp_enabled():
            raise RuntimeError("No viable backend for scaled_dot_product_attention was found.")

    assert probe(math_only) == Kernel.MATH
    assert probe(lambda: None) == Kernel.FLASH  # flash comes first in torch's order


def test_a_call_no_backend_runs_is_an_error_not_a_silent_choice():
    def never():
        raise RuntimeError("No viable backend for scaled_dot_product_attention was found.")

    with pytest.raises(RuntimeError, match="no SDPA backend runs this model's attention here"):
        probe(never)


def test_grouped_decode_through_sdpa_equals_the_grouped_matmuls():
    """What one-token rows compute on a GPU (SDPA, each KV head's query heads as its queries, a key mask) against
    what they compute on a CPU, for rows that see different numbers of keys."""
    torch.manual_seed(0)
    query, key, value = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    mask = (torch.arange(40)[None, :] < torch.tensor([[40], [17], [1]]))[:, None, None]  # [B, 1, 1, T]
    on_gpu = attention.decode_attention(query, key, value, mask, 0.25, sdpa=True)
    torch.testing.assert_close(on_gpu, attention.decode_attention(query, key, value, mask, 0.25), rtol=1e-5,
                               atol=1e-5)
    assert on_gpu.shape == (3, 8, 1, 16)
