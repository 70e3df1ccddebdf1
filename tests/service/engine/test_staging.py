"""service/engine/staging.py: a step's host lists as device tensors (pinned and non-blocking on a GPU)."""

from __future__ import annotations

import torch

from service.engine.staging import to_device
from tests.support import TEST_DEVICE


def test_lists_become_tensors_of_the_asked_dtype_on_the_device():
    device = torch.device(TEST_DEVICE)
    ids = to_device([[3, 1], [4, 1]], device)
    assert ids.dtype == torch.long and ids.device.type == device.type
    assert ids.cpu().tolist() == [[3, 1], [4, 1]]
    temperatures = to_device([0.7, 1.0], device, torch.float32)
    assert temperatures.dtype == torch.float32 and temperatures.cpu().tolist() == [0.699999988079071, 1.0]
    assert to_device([], device).shape == (0,)
