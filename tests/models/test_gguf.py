"""The GGUF reader and loader against the gguf package's own dequantization and transformers' loader."""

from __future__ import annotations

import pytest
import torch
from gguf import GGUFReader, quants

from service.models.gguf import llama_config, read_dense, read_gguf, unpack_int4, unpermute_rows
from service.models.loader import default_model_file, load_model
from service.models.quant.int4 import Int4Linear, dequantize
from service.models.quant.precision import choose
from service.models.quant.quantize import Int8Linear, Quantization, quantize_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gguf_file():
    return read_gguf(default_model_file())


@pytest.fixture(scope="module")
def reference():
    return {t.name: t for t in GGUFReader(str(default_model_file())).tensors}


def test_index_and_config(gguf_file, reference):
    assert set(gguf_file.tensors) == set(reference)
    config = llama_config(gguf_file)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings and config.max_position_embeddings == 8192


@pytest.mark.parametrize("name", ["blk.0.ffn_up.weight", "blk.3.attn_q.weight", "token_embd.weight",
                                  "blk.0.attn_norm.weight"])
def test_tensors_read_equal_the_gguf_package(gguf_file, reference, name):
    ours, theirs = gguf_file.tensors[name], reference[name]
    expected = torch.from_numpy(quants.dequantize(theirs.data, theirs.tensor_type)).float()
    assert torch.equal(read_dense(ours), expected.view(read_dense(ours).shape))


def test_q4_1_maps_losslessly_onto_the_int4_layout(gguf_file, reference):
    tensor = gguf_file.tensors["blk.0.ffn_gate.weight"]
    rows, cols = (int(n) for n in reversed(tensor.shape))
    q, scale, zero = unpack_int4(tensor.tensor_type, tensor.data, rows, cols)
    expected = torch.from_numpy(quants.dequantize(reference[tensor.name].data, tensor.tensor_type)).float()
    torch.testing.assert_close(dequantize(q, scale, zero, 32), expected, rtol=0, atol=1e-6)
    layer = Int4Linear.from_quantized(q, scale, zero, 32, compute_dtype=torch.bfloat16)
    x = torch.randn(4, cols)
    y, want = layer(x), x @ expected.T
    assert (y - want).norm() / want.norm() < 1e-2  # the kernel rounds its inputs to bfloat16


def test_unpermute_restores_transformers_row_order():
    heads, rows = 3, 12  # llama.cpp permutes each head's rows (pairs -> halves) for its rotary
    hf = torch.arange(rows)
    permuted = hf.view(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)  # what the converter writes
    assert torch.equal(permuted[unpermute_rows(rows, heads)], hf)


@pytest.mark.slow
def test_packed_and_dense_loads_answer_alike():
    """The default (packed int4 from the file) and the dequantized model give the same greedy answer."""
    prompt = "What is the capital of France?"
    answers = []
    for mode in (Quantization.AUTO, Quantization.NONE):
        loaded = load_model("", CPU, torch.float32, mode)
        ids = loaded.tokenizer.encode_chat(prompt, (), None)
        with torch.inference_mode():
            out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
        answers.append(loaded.tokenizer.decode(out[0, len(ids):].tolist()))
        kinds = {type(m).__name__ for m in loaded.model.model.layers.modules()}
        assert ("Int4Linear" in kinds) == (mode == Quantization.AUTO)
    assert "Paris" in answers[0] and answers[0] == answers[1]


@pytest.mark.slow
@pytest.mark.parametrize("prompt_on", ["dense copies", "packed kernels"])
def test_the_answer_does_not_depend_on_which_kernel_computes_the_prompt(prompt_on):
    """A prompt runs on the dense copies or, in short chunks (a reused prefix's remainder, say), on the packed
    kernels that decode uses: both give the dense model's answer. (Our kernel's inputs rounded to one int8 part per
    group, as llama.cpp's are, gave "L'Étoile, la Cité" here.)"""
    from service.engine.model_runner import ModelRunner
    from service.engine.solo import Solo
    from service.models.quant.kernel_choice import switchable

    loaded = load_model("", CPU, torch.float32, Quantization.AUTO)
    runner = ModelRunner(loaded.model, num_blocks=9, block_size=16, max_rows=1, max_context=128)
    if prompt_on == "packed kernels":
        for layer in switchable([*runner.fast.modules(), runner.lm_head]):
            layer.dense_from_rows = layer.NEVER
    ids = loaded.tokenizer.encode_chat("What is the capital of France?", (), None)
    solo = Solo(runner)
    tokens = [int(solo.prefill(ids).argmax())]
    for _ in range(7):
        tokens.append(int(solo.decode(tokens[-1]).argmax()))
    assert loaded.tokenizer.decode(tokens).startswith("The capital of France is Paris")


def test_quantize_model_replaces_every_linear():
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 64))
    layer.config = type("Config", (), {"tie_word_embeddings": True})()
    x = torch.randn(3, 64)
    dense = layer(x)
    assert quantize_model(layer, Quantization.INT8) == 2
    assert all(isinstance(m, Int8Linear) for m in layer)
    torch.testing.assert_close(layer(x), dense, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("free_gib, dtype, mode", [
    (64, None, Quantization.NONE),  # fits as it is: the fast dtype, dense
    (20, torch.bfloat16, Quantization.NONE),  # float32 (25 GB) would not fit: bfloat16
    (10, torch.float32, Quantization.INT8),  # not even bfloat16: quantized
    (5, torch.float32, Quantization.INT4),
])
def test_auto_precision_never_picks_weights_that_do_not_fit(monkeypatch, free_gib, dtype, mode):
    from service.models.quant import precision

    monkeypatch.setattr(precision, "free_bytes", lambda device: free_gib * 2**30)
    plan = choose("auto", "auto", CPU, 6_240_000_000, gguf=False)  # ChatGLM2-6B
    assert plan.quantize == mode and plan.dtype == (dtype or precision.fast_dtype(CPU)), plan
    if plan.dtype != precision.fast_dtype(CPU) or plan.quantize != Quantization.NONE:
        assert "would not fit" in plan.reason


def test_auto_precision_refuses_what_fits_nowhere(monkeypatch):
    from service.models.quant import precision

    monkeypatch.setattr(precision, "free_bytes", lambda device: 2**30)
    with pytest.raises(MemoryError, match="do not fit"):
        choose("auto", "auto", CPU, 6_240_000_000, gguf=False)


def test_explicit_choices_and_gguf_defaults():
    assert choose("auto", "auto", CPU, None, gguf=True).quantize == Quantization.INT4
    assert choose("bfloat16", "int8", CPU, None, gguf=False).dtype == torch.bfloat16


def test_weight_formats_equal_the_contracts_and_count_weights():
    """GetModelInfo's weight_format: the enum converts to chat.v1's by value, and the format holding most linear
    weights wins (the default model's LM head is int8, its layers int4)."""
    from chat.v1 import chat_pb2

    from service.models.quant.quantize import WeightFormat, weight_format

    for kind in WeightFormat:
        assert chat_pb2.WeightFormat.Name(int(kind)) == f"WEIGHT_FORMAT_{kind.name}"
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    assert weight_format(model) == WeightFormat.DENSE
    model[0] = Int8Linear(model[0].weight, None, torch.bfloat16)  # 4096 int8 weights against 2048 dense
    assert weight_format(model) == WeightFormat.INT8


@pytest.mark.parametrize("dtype, quantize, form", [("auto", "int4", "int4"), ("auto", "int8", "int8"),
                                                   ("float32", "none", "float32"), ("bfloat16", "int8", "int8")])
def test_every_explicit_choice_is_checked_against_free_memory(monkeypatch, dtype, quantize, form):
    """The fit check covers every mode, not only auto's: 60 B weights fit nowhere in 8 GiB, said at start-up."""
    from service.models.quant import precision

    monkeypatch.setattr(precision, "free_bytes", lambda device: 8 * 2**30)
    with pytest.raises(MemoryError, match=f"60.0 B weights as {form} need"):
        choose(dtype, quantize, CPU, 60_000_000_000, gguf=False)
    assert choose(dtype, quantize, CPU, 1_000_000, gguf=False).quantize == Quantization(quantize)
