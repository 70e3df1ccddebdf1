"""service/engine/kv_budget.py: what `--kv-cache-tokens auto` picks."""

from __future__ import annotations

import torch

from service.config import load_config
from service.engine.kv_budget import CPU_DEFAULT, auto_kv_tokens, bytes_per_position, pool_tokens
from tests.service.engine.tiny_llama import tiny_llama


def test_a_position_holds_keys_and_values_of_every_layer():
    model = tiny_llama()  # 2 layers, 2 KV heads of 16
    assert bytes_per_position(model.config, torch.float32) == 2 * 2 * 2 * 16 * 4
    assert bytes_per_position(model.config, torch.bfloat16) == 2 * 2 * 2 * 16 * 2


def test_the_pool_takes_its_share_of_the_free_memory_less_the_activations_in_whole_blocks():
    # 10 GiB free, 90 % of it, less 1 GiB of activations: 8 GiB, at 1 KiB a position in blocks of 16
    assert pool_tokens(10 * 2**30, 2**30, 1024, 16) == 8 * 2**30 // 1024
    assert pool_tokens(10 * 2**30, 2**30, 1000, 16) % 16 == 0
    assert pool_tokens(2**20, 2**30, 1024, 16) == 0  # nothing left


def test_auto_on_cpu_is_the_default_pool():
    assert auto_kv_tokens(tiny_llama().cpu(), 512, 16) == CPU_DEFAULT  # a CPU model, on any test device


def test_the_flag_and_the_variable_take_auto():
    assert load_config(["--kv-cache-tokens", "auto"], {}).limits.kv_cache_tokens == 0
    assert load_config([], {"CHAT_KV_CACHE_TOKENS": "AUTO"}).limits.kv_cache_tokens == 0
    assert load_config(["--kv-cache-tokens", "4096"], {}).limits.kv_cache_tokens == 4096
