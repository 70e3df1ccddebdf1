"""The packed-weight cache (service/models/weight_cache.py): a model quantized at load is kept under --cache-dir
and read back on the next load, bit for bit; a changed checkpoint misses; a damaged entry is detected, logged,
deleted and rebuilt; each quantization mode has its own entry; an unwritable cache only costs the caching."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from service.models import chatglm2, weight_cache
from service.models.loader import load_model
from service.models.quant.int4 import Int4Linear
from service.models.quant.quantize import Int8Linear, Quantization
from service.models.weight_cache import DATA_FILE, MANIFEST_FILE, WeightCache, cache_key
from tests.models.chatglm2_golden import DATA_ROOT, greedy, last_logits, read_cases

DATA = DATA_ROOT / "chatglm2-tiny"
CASES = read_cases(DATA)
CPU = torch.device("cpu")
WROTE = "wrote packed weights to cache"
READ = "loaded packed weights from cache"


def load(path: Path, cache: Path, mode: Quantization = Quantization.INT4, dtype: torch.dtype = torch.float32):
    return load_model(str(path), CPU, dtype, mode, cache)


def entries(cache: Path) -> list[Path]:
    folder = cache / weight_cache.FOLDER
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def assert_same_model(mine: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """The same modules, tensors bit for bit, and the same logits and greedy ids on every golden case."""
    assert [(n, type(m)) for n, m in mine.named_modules()] == [(n, type(m)) for n, m in theirs.named_modules()]
    mine_state, their_state = mine.state_dict(), theirs.state_dict()
    assert list(mine_state) == list(their_state)
    for name, tensor in mine_state.items():
        assert tensor.dtype == their_state[name].dtype and torch.equal(tensor, their_state[name]), name
    for (name, a), (_, b) in zip(mine.named_buffers(), theirs.named_buffers(), strict=True):  # non-persistent too
        assert torch.equal(a, b), name
    for case in CASES:
        assert torch.equal(last_logits(mine, case["input_ids"]), last_logits(theirs, case["input_ids"]))
        eos = frozenset({2})
        assert greedy(mine, case["input_ids"], eos, 8) == greedy(theirs, case["input_ids"], eos, 8)


def copy_checkpoint(dest: Path) -> Path:
    shutil.copytree(DATA, dest, ignore=shutil.ignore_patterns("expected.json", "README.md"))
    for path in dest.iterdir():
        path.chmod(0o644)
    return dest


def never_quantize(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the checkpoint's weights (and so quantizing them) fails from here on."""
    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint's weights were read")

    monkeypatch.setattr(chatglm2, "fill_model", refuse)


# ---------------------------------------------------------------- hits


@pytest.mark.parametrize("mode", [Quantization.INT4, Quantization.INT8])
def test_a_second_load_reads_the_cache_and_is_bit_identical(mode: Quantization, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO)
    first = load(DATA, tmp_path, mode)
    assert WROTE in caplog.text and READ not in caplog.text
    [entry] = entries(tmp_path)
    assert {p.name for p in entry.iterdir()} == {DATA_FILE, MANIFEST_FILE}
    caplog.clear()
    never_quantize(monkeypatch)
    second = load(DATA, tmp_path, mode)
    assert f"{READ} {entry} in" in caplog.text and WROTE not in caplog.text
    packed = Int4Linear if mode == Quantization.INT4 else Int8Linear
    assert type(second.model.lm_head) is packed and type(second.model.model.layers[0].mlp.down_proj) is packed
    assert not second.model.training and not any(p.requires_grad for p in second.model.parameters())
    assert second.model.config.tie_word_embeddings is False
    assert (second.name, second.context_length) == (first.name, first.context_length)
    assert second.model.generation_config.eos_token_id == first.model.generation_config.eos_token_id
    assert_same_model(second.model, first.model)


def test_the_cache_holds_packed_weights_not_dense_ones(tmp_path: Path) -> None:
    """The entry is about the size of the packed model: no float copy of a quantized layer."""
    loaded = load(DATA, tmp_path)
    [entry] = entries(tmp_path)
    manifest = json.loads((entry / MANIFEST_FILE).read_text())
    int4 = {name for name, spec in manifest["modules"].items() if spec["class"] == "Int4Linear"}
    assert "lm_head" in int4 and "model.layers.1.self_attn.q_proj" in int4
    for name, described in manifest["tensors"].items():
        owner = name.rpartition(".")[0]
        if owner in int4 and not name.endswith(".bias"):
            assert described["dtype"] != "torch.float32", name
    model_bytes = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
    assert (entry / DATA_FILE).stat().st_size < 1.2 * model_bytes + 100_000
    assert manifest["key"] == cache_key(DATA, "chatglm2", Quantization.INT4, torch.float32, CPU).as_json()


def test_each_mode_and_dtype_has_its_own_entry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    int4 = load(DATA, tmp_path, Quantization.INT4)
    int8 = load(DATA, tmp_path, Quantization.INT8)
    load(DATA, tmp_path, Quantization.INT4, torch.bfloat16)
    assert caplog.text.count(WROTE) == 3 and READ not in caplog.text
    names = [p.name for p in entries(tmp_path)]
    assert len(names) == 3 and {n.split("-")[2:4][0] for n in names} == {"int4", "int8"}
    caplog.clear()
    assert_same_model(load(DATA, tmp_path, Quantization.INT8).model, int8.model)
    assert_same_model(load(DATA, tmp_path, Quantization.INT4).model, int4.model)
    assert caplog.text.count(READ) == 2 and WROTE not in caplog.text


def test_no_cache_without_quantizing(tmp_path: Path) -> None:
    """A dense load quantizes nothing: nothing is cached."""
    load(DATA, tmp_path, Quantization.NONE)
    assert entries(tmp_path) == []


def test_the_int4_checkpoint_is_cached_as_repacked(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """chatglm2-6b-int4's nibbles are repacked for torch's kernel at load: kept as repacked, and read back bit for
    bit (so still within the golden tolerance of THUDM's own kernels)."""
    int4 = DATA_ROOT / "chatglm2-int4-tiny"
    caplog.set_level(logging.INFO)
    first = load(int4, tmp_path, Quantization.NONE)
    never_quantize(monkeypatch)
    second = load(int4, tmp_path, Quantization.NONE)
    assert caplog.text.count(WROTE) == 1 and caplog.text.count(READ) == 1
    assert type(second.model.model.layers[0].mlp.down_proj) is Int4Linear
    assert type(second.model.lm_head) is torch.nn.Linear  # float, as the checkpoint stores it
    for case in read_cases(int4):
        assert torch.equal(last_logits(second.model, case["input_ids"]), last_logits(first.model, case["input_ids"]))
        error = (last_logits(second.model, case["input_ids"]) - torch.tensor(case["last_logits"])).abs().max()
        assert error < 1e-4


# ---------------------------------------------------------------- misses


@pytest.mark.parametrize("change", ["mtime", "size", "config"])
def test_a_changed_checkpoint_misses_the_cache(change: str, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    path = copy_checkpoint(tmp_path / "ckpt")
    cache = tmp_path / "cache"
    load(path, cache)
    [old] = entries(cache)
    shard = path / "pytorch_model-00002-of-00003.bin"
    stat = shard.stat()
    if change == "mtime":
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    elif change == "size":  # the same tensors in float64: another size, the mtime put back
        torch.save({k: v.double() for k, v in torch.load(shard, weights_only=True).items()}, shard)
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert shard.stat().st_size != stat.st_size
    else:
        config = path / "config.json"
        config.write_text(config.read_text().replace('"layernorm_epsilon": 1e-05', '"layernorm_epsilon": 1e-06'))
    caplog.clear()
    changed = load(path, cache)
    assert WROTE in caplog.text and READ not in caplog.text
    [new] = entries(cache)  # the old entry can never be read again: deleted
    assert new != old and not old.exists()
    if change != "config":
        assert_same_model(changed.model, load(path, tmp_path / "fresh").model)


def test_a_moved_checkpoint_misses_the_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    load(copy_checkpoint(tmp_path / "a"), tmp_path / "cache")
    load(copy_checkpoint(tmp_path / "b"), tmp_path / "cache")
    assert caplog.text.count(WROTE) == 2 and len(entries(tmp_path / "cache")) == 2


def test_the_layout_version_and_torch_are_in_the_key() -> None:
    """Bumping PACKED_LAYOUT_VERSION, or another torch, names another entry."""
    base = cache_key(DATA, "chatglm2", Quantization.INT4, torch.float32, CPU)
    assert base.layout == weight_cache.PACKED_LAYOUT_VERSION and base.torch == torch.__version__
    bumped = weight_cache.CacheKey(**{**base.__dict__, "layout": base.layout + 1})
    newer = weight_cache.CacheKey(**{**base.__dict__, "torch": "99.0"})
    assert len({base.entry_name, bumped.entry_name, newer.entry_name}) == 3
    assert base.entry_name == cache_key(DATA, "chatglm2", Quantization.INT4, torch.float32, CPU).entry_name


# ---------------------------------------------------------------- damage


def flip_byte(path: Path, at: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte in the tensor data": lambda e: flip_byte(e / DATA_FILE, 0.6),
    "flipped byte in the pickle": lambda e: flip_byte(e / DATA_FILE, 0.0001),
    "truncated data": lambda e: os.truncate(e / DATA_FILE, (e / DATA_FILE).stat().st_size // 2),
    "empty data": lambda e: os.truncate(e / DATA_FILE, 0),
    "data file missing": lambda e: (e / DATA_FILE).unlink(),
    "truncated manifest": lambda e: os.truncate(e / MANIFEST_FILE, 100),
    "manifest of another key": lambda e: edit_manifest(e, lambda m: m["key"].update(quantize="int8")),
    "manifest with another shape": lambda e: edit_manifest(
        e, lambda m: m["tensors"]["model.norm.weight"].update(shape=[63])),
    "manifest with another module": lambda e: edit_manifest(e, lambda m: m["modules"]["lm_head"].update(
        {"class": "Int8Linear"})),
    "manifest without a tensor": lambda e: edit_manifest(e, lambda m: m["tensors"].pop("model.norm.weight")),
}


def edit_manifest(entry: Path, edit) -> None:
    manifest = json.loads((entry / MANIFEST_FILE).read_text())
    edit(manifest)
    (entry / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_detected_logged_and_rebuilt(damage: str, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    first = load(DATA, tmp_path)
    [entry] = entries(tmp_path)
    DAMAGE[damage](entry)
    caplog.set_level(logging.INFO)
    rebuilt = load(DATA, tmp_path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"packed-weight cache entry {entry} is not valid" in warnings[0].getMessage()
    assert "deleting it" in warnings[0].getMessage()
    assert WROTE in caplog.text and READ not in caplog.text  # quantized again and written anew
    assert entries(tmp_path) == [entry]
    assert_same_model(rebuilt.model, first.model)
    caplog.clear()
    assert_same_model(load(DATA, tmp_path).model, first.model)  # the rewritten entry is read
    assert READ in caplog.text and "WARNING" not in caplog.text


def test_a_start_killed_while_writing_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Killed before the rename: only a `.partial-*` directory is left; the next load misses, quantizes, and
    deletes the leftover (its writer's lock is free)."""
    def killed(*args):
        raise SystemExit("killed")

    monkeypatch.setattr(weight_cache.os, "rename", killed)
    with pytest.raises(SystemExit):
        load(DATA, tmp_path)
    monkeypatch.undo()
    folder = tmp_path / weight_cache.FOLDER
    assert entries(tmp_path) == [] and any(p.name.startswith(".partial-") for p in folder.iterdir())
    caplog.set_level(logging.INFO)
    load(DATA, tmp_path)
    assert WROTE in caplog.text and "left by a start that did not finish" in caplog.text
    assert [p.name for p in folder.iterdir()] == [entries(tmp_path)[0].name]


def test_an_unwritable_cache_logs_and_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    caplog.set_level(logging.INFO)
    loaded = load(DATA, blocked)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not write packed weights to cache" in warnings[0]
    assert "continuing without caching" in warnings[0]
    assert_same_model(loaded.model, load(DATA, tmp_path / "cache").model)


def test_a_full_disk_is_an_unwritable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(weight_cache.torch, "save", full)
    caplog.set_level(logging.INFO)
    load(DATA, tmp_path)
    assert "could not write packed weights" in caplog.text
    assert list((tmp_path / weight_cache.FOLDER).iterdir()) == []  # nothing partial left


def test_models_with_dense_copies_are_not_cached(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Dense copies are made at load (and laid out at run time): a model holding one is not cached."""
    model = load(DATA, tmp_path / "a").model
    model.model.layers[0].mlp.down_proj.keep_dense(torch.zeros(64, 128))
    caplog.set_level(logging.INFO)
    key = cache_key(DATA, "chatglm2", Quantization.INT4, torch.float32, CPU)
    assert WeightCache(tmp_path / "b").store(key, model) is None and "dense copies" in caplog.text


# ---------------------------------------------------------------- transformers models


def write_tiny_llama(dest: Path, tied: bool) -> Path:
    """A tiny random Llama with a word-level tokenizer and a chat template, as save_pretrained writes them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(94)}}
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tied, eos_token_id=1, bos_token_id=None, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(dest)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(dest)
    return dest


@pytest.mark.parametrize("tied", [True, False], ids=["tied head", "own head"])
@pytest.mark.parametrize("mode", [Quantization.INT4, Quantization.INT8])
def test_transformers_models_are_cached_too(mode: Quantization, tied: bool, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    path = write_tiny_llama(tmp_path / "llama", tied)
    caplog.set_level(logging.INFO)
    first = load(path, tmp_path / "cache", mode)
    second = load(path, tmp_path / "cache", mode)
    assert caplog.text.count(WROTE) == 1 and caplog.text.count(READ) == 1
    packed = Int4Linear if mode == Quantization.INT4 else Int8Linear
    assert type(second.model.model.layers[0].self_attn.q_proj) is packed
    assert second.model.config.tie_word_embeddings == first.model.config.tie_word_embeddings
    if type(second.model.lm_head) is torch.nn.Linear:  # int4 has no kernel for 96 rows: the tied head stays
        assert second.model.lm_head.weight is second.model.model.embed_tokens.weight
    assert second.model.generation_config.eos_token_id == first.model.generation_config.eos_token_id
    assert second.tokenizer.eos_token_ids == first.tokenizer.eos_token_ids
    ids = second.tokenizer.encode_chat("w1 w2 w3 w4", (), None)
    assert torch.equal(last_logits(second.model, ids), last_logits(first.model, ids))
    assert greedy(second.model, ids, frozenset({1}), 8) == greedy(first.model, ids, frozenset({1}), 8)
    for (name, a), (_, b) in zip(second.model.state_dict().items(), first.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_the_default_gguf_in_int8_is_cached(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SmolLM2's GGUF with --quantize int8 re-quantizes its dequantized layers: cached. Its 4-bit default reads the
    file's own packed layers (with dense copies for prefills): not cached."""
    caplog.set_level(logging.INFO)
    first = load_model("", CPU, torch.float32, Quantization.INT8, tmp_path)
    second = load_model("", CPU, torch.float32, Quantization.INT8, tmp_path)
    assert caplog.text.count(WROTE) == 1 and caplog.text.count(READ) == 1
    ids = second.tokenizer.encode_chat("What is the capital of France?", (), None)
    assert torch.equal(last_logits(second.model, ids), last_logits(first.model, ids))
    load_model("", CPU, torch.float32, Quantization.AUTO, tmp_path)
    assert len(entries(tmp_path)) == 1
