"""service/models/quant/kernel_choice.py: where packed layers switch to their dense copies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.models.quant import kernel_choice, kernels
from service.models.quant.int4 import DenseCopy, Int4Linear, Kernel, quantize_int4
from service.models.quant.kernel_choice import MEASURED_ROWS, choose_dense_switch, dense_switch, switchable


class Clock:
    """A virtual perf_counter for kernel_choice: the stand-in kernels below advance it, so the timings are exact."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms / 1e3


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(kernel_choice, "time", fake)
    return fake


class Timed(DenseCopy, nn.Module):
    """A stand-in layer whose packed kernel takes `packed_ms_per_row` per row; its dense copy (a plain one,
    through `F.linear`, see `dense_takes`) a fixed time, so the crossover is known."""

    def __init__(self, clock: Clock, packed_ms_per_row: float, out_features: int = 16, in_features: int = 8):
        super().__init__()
        self.clock, self.packed_ms_per_row = clock, packed_ms_per_row
        self.in_features, self.out_features = in_features, out_features
        self.keep_dense(torch.zeros(out_features, in_features))
        self.timed_rows = []

    def packed_matmul(self, x):
        self.timed_rows.append(x.shape[0])
        self.clock.spend(self.packed_ms_per_row * x.shape[0])
        return x.new_zeros(x.shape[0], self.out_features)


def dense_takes(monkeypatch, clock: Clock, ms: float) -> None:
    real = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        clock.spend(ms)
        return real(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)


def test_switch_is_the_first_count_from_which_dense_wins(monkeypatch, clock):
    dense_takes(monkeypatch, clock, 6.0)
    # packed: 1 ms a row -> 1, 2, 4 rows beat 6 ms; 8 and 16 rows lose
    assert dense_switch([Timed(clock, 1.0)], [1, 2, 4, 8, 16]) == 8


def test_a_pass_over_all_layers_of_a_shape_is_what_is_compared(monkeypatch, clock):
    dense_takes(monkeypatch, clock, 6.0)
    layers = [Timed(clock, 1.0) for _ in range(3)]  # a step reads each weight once: so does the measurement
    assert dense_switch(layers, [1, 2, 4, 8, 16]) == 8
    assert all(layer.timed_rows == layers[0].timed_rows != [] for layer in layers)


def test_switch_past_the_largest_count_when_packed_always_wins(monkeypatch, clock):
    dense_takes(monkeypatch, clock, 50.0)
    assert dense_switch([Timed(clock, 0.1)], [1, 2, 4, 8]) == 9


def test_counts_past_the_measured_limit_are_not_timed(monkeypatch, clock):
    dense_takes(monkeypatch, clock, 3.0)
    layer = Timed(clock, 1.0)  # packed wins at 1 and 2 rows (1, 2 ms against 3), loses at 4
    assert dense_switch([layer], [1, 2, 4, MEASURED_ROWS * 4]) == 4
    assert MEASURED_ROWS * 4 not in layer.timed_rows and 2 in layer.timed_rows  # stopped at the first packed win
    assert 1 not in layer.timed_rows


def test_choose_sets_every_layer_of_a_shape_and_skips_layers_without_a_copy():
    weight = torch.randn(64, 64)
    q, scale, zero = quantize_int4(weight, 32)
    with_copy = [Int4Linear.from_quantized(q, scale, zero, 32, compute_dtype=torch.bfloat16) for _ in range(3)]
    for layer in with_copy:
        layer.keep_dense(weight)
    without = Int4Linear.from_quantized(q, scale, zero, 32, compute_dtype=torch.bfloat16)
    model = nn.Sequential(*with_copy, without, nn.Linear(64, 64))
    assert switchable(model.modules()) == with_copy
    chosen = choose_dense_switch(model.modules(), [1, 4, 16])
    assert list(chosen) == [("Int4Linear", 64, 64, "torch.float32")]
    assert {layer.dense_from_rows for layer in with_copy} == {chosen[("Int4Linear", 64, 64, "torch.float32")]}
    assert without.dense_from_rows == DenseCopy.NEVER  # untouched: no copy, the packed kernel at every size


@pytest.mark.parametrize("kernel", [Kernel.TORCH, pytest.param(Kernel.OWN, marks=pytest.mark.skipif(
    not kernels.available(), reason="own kernels not built here"))])
def test_either_side_of_the_switch_computes_the_same_layer(kernel):
    torch.manual_seed(0)
    weight = torch.randn(128, 64)
    q, scale, zero = quantize_int4(weight, 32)
    layer = Int4Linear.from_quantized(q, scale, zero, 32, compute_dtype=torch.bfloat16, kernel=kernel)
    layer.keep_dense(layer.packed_matmul(torch.eye(64)).T)  # the packed weight itself (rows of I are exact in both)
    x = torch.randn(8, 64).bfloat16().float()  # exact in bf16: both sides see the same inputs
    layer.dense_from_rows = 1
    dense = layer(x)
    layer.dense_from_rows = 9
    packed = layer(x)
    if kernel is Kernel.TORCH:  # both round their outputs (about 8 in size) to bf16, whose step there is 0.0625
        torch.testing.assert_close(dense, packed, atol=0.07, rtol=0.01)
    else:  # ours rounds the inputs to ~16 bits per group of 32; the copy is bf16, as in the TORCH case
        torch.testing.assert_close(dense, packed, atol=0.07, rtol=0.01)
