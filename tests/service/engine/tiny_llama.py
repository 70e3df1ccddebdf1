"""A tiny random Llama and its plain transformers forward: what the runner tests compare the engine against."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.support import TEST_DEVICE

VOCAB = 97


def tiny_llama() -> LlamaForCausalLM:
    """2 layers, hidden 64, 4 heads on 2 KV heads (grouped), 1024 positions, seeded, in float32 on TEST_DEVICE (the
    tests built on it compare in float32, on a GPU as on a CPU)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval().to(TEST_DEVICE)


def reference(model, ids: list[int]) -> torch.Tensor:
    """Last-position logits [V] of the plain transformers forward over the whole sequence."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float()
