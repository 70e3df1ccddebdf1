"""bench/peers_chatglm2.py's pure parts: the overlay llama.cpp's converter reads, the tokenizer it loads from it,
what decides reusing a GGUF, the memory figures and the targets. No model, converter or llama-server runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bench import peers_chatglm2 as peers
from service.models.chatglm2_tokenizer import ChatGLM2Tokenizer

TINY = Path(__file__).resolve().parents[1] / "data" / "chatglm2-tiny"


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A copy of the tiny fixture with a THUDM-style remote-code file in it, as real checkpoints have."""
    out = tmp_path / "ckpt"
    out.mkdir()
    for path in TINY.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    (out / "tokenization_chatglm.py").write_text("raise ImportError('THUDM remote code')\n")
    return out


def test_the_overlay_links_the_weights_and_rewrites_only_its_own_configs(checkpoint, tmp_path):
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    overlay = peers.make_overlay(checkpoint, tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == before  # the checkpoint is untouched
    linked = {p.name for p in overlay.iterdir() if p.is_symlink()}
    assert linked == {name for name in before if name not in peers.REPLACED and not name.endswith(".py")}
    assert all((overlay / name).resolve() == (checkpoint / name).resolve() for name in linked)
    config = json.loads((overlay / "config.json").read_text())
    original = json.loads(before["config.json"])
    assert config["_name_or_path"] == peers.CONVERTER_NAME_OR_PATH
    assert config["_chat_v1_original_name_or_path"] == original["_name_or_path"]
    assert {k: v for k, v in config.items() if not k.startswith("_")} == {
        k: v for k, v in original.items() if not k.startswith("_")}
    tokenizer_config = json.loads((overlay / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_chatglm.ChatGLMTokenizer"
    assert (overlay / "tokenization_chatglm.py").read_bytes() == peers.TOKENIZER_MODULE.read_bytes()
    assert not (overlay / "tokenization_chatglm.py").is_symlink()
    # made again from scratch: a second call replaces the first
    assert peers.make_overlay(checkpoint, tmp_path / "hf") == overlay


def test_the_converter_can_load_the_overlays_tokenizer_as_it_does(checkpoint, tmp_path):
    """AutoTokenizer(trust_remote_code=True), as convert_hf_to_gguf's set_vocab_chatglm3 calls it, in a fresh
    process (its remote-code module cache is its own); then every call the converter makes."""
    overlay = peers.make_overlay(checkpoint, tmp_path / "hf")
    script = f"""
import json
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained({str(overlay)!r}, trust_remote_code=True)
sp = t.tokenizer.sp_model
vocab = t.get_vocab()
print(json.dumps({{"n": sp.vocab_size(), "max_id": max(vocab.values()), "vocab_size": t.vocab_size,
    "pieces": [t._convert_id_to_token(i) for i in range(1010)],
    "scores": [sp.get_score(i) for i in range(sp.vocab_size())],
    "kinds": [[sp.is_unknown(i), sp.is_control(i), sp.is_unused(i), sp.is_byte(i)] for i in range(sp.vocab_size())],
    "ids": t.encode("Explain why the sky is blue.", add_special_tokens=False)}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    ours = ChatGLM2Tokenizer(TINY / "tokenizer.model")
    assert found["n"] == ours.piece_count == 1000
    assert found["vocab_size"] == ours.vocab_size and found["max_id"] == ours.vocab_size - 1
    pieces = found["pieces"]
    assert {name: pieces.index(name) for name in ours.special_ids} == ours.special_ids  # 1000..1004, as ours
    assert pieces[:3] == ["", "", ""]  # unk/pad, bos, eos: the converter names them itself
    assert pieces[1005:] == [""] * 5  # the padded vocab: the converter writes [PAD<id>], unused
    assert all(pieces[3:1000])
    assert found["ids"] == ours.encode_text("Explain why the sky is blue.")
    assert len(found["scores"]) == len(found["kinds"]) == 1000


def test_dense_only(checkpoint):
    peers.check_dense(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}))
    with pytest.raises(SystemExit, match="dense"):
        peers.check_dense(checkpoint)


def test_a_gguf_is_reused_only_for_the_same_checkpoint_files(checkpoint):
    first = peers.identity(checkpoint)
    assert peers.identity(checkpoint) == first
    shard = checkpoint / "pytorch_model-00001-of-00003.bin"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert peers.identity(checkpoint) != first
    assert ["quant", "Q4_0"] in first


def test_a_matching_manifest_skips_the_conversion(checkpoint, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "chatglm2-q4_0.gguf").write_bytes(b"GGUF")
    (work / "manifest.json").write_text(json.dumps({"identity": peers.identity(checkpoint), "convert_s": 1.0}))
    out, made = peers.ensure_gguf(checkpoint, work, tmp_path / "no-llama-quantize", 2, keep_f16=False)
    assert out == work / "chatglm2-q4_0.gguf" and made["reused"] is True
    (work / "manifest.json").write_text(json.dumps({"identity": [], "convert_s": 1.0}))
    with pytest.raises(SystemExit, match="llama-quantize"):  # stale: it would convert, and has no llama-quantize
        peers.ensure_gguf(checkpoint, work, tmp_path / "no-llama-quantize", 2, keep_f16=False)


def test_commands():
    convert = peers.converter_command("py", Path("/o/hf"), Path("/o/f16.gguf"), "ckpt")
    assert convert[1].endswith("convert_hf_to_gguf.py") and convert[2] == "/o/hf"
    assert convert[convert.index("--outtype") + 1] == "f16" and convert[convert.index("--outfile") + 1] == "/o/f16.gguf"
    assert peers.quantize_command(Path("/b/llama-quantize"), Path("a.gguf"), Path("b.gguf"), 2) == [
        "/b/llama-quantize", "a.gguf", "b.gguf", "Q4_0", "2"]


def test_prompts_are_chat_v1s_ids_and_the_comparison_names_the_first_difference():
    _tokenizer, ids, texts = peers.chat_prompts(TINY)
    ours = ChatGLM2Tokenizer(TINY / "tokenizer.model")
    assert all(i[:2] == [ours.special_ids["[gMASK]"], ours.special_ids["sop"]] for i in ids)
    assert [i[2:] for i in ids] == [ours.encode_text(t) for t in texts]
    assert texts[0].startswith("[Round 1]\n\n问：") and texts[0].endswith("\n\n答：")
    same = peers.compare_tokenization([[1, 2], [3]], [[1, 2], [3]])
    assert same == {"prompts": 2, "identical": 2, "first_difference": None}
    differs = peers.compare_tokenization([[1, 2], [3]], [[1, 2], [4, 5]])
    assert differs["identical"] == 1 and differs["first_difference"] == {"prompt": 1, "chat_v1": [3],
                                                                         "llama_cpp": [4, 5]}


def test_parse_status():
    text = "Name:\tx\nVmPeak:\t 9000 kB\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nRssAnon:\t 51200 kB\n" \
           "RssFile:\t   51200 kB\nThreads:\t3\n"
    assert peers.parse_status(text) == {"VmHWM": 200.0, "VmRSS": 100.0, "RssAnon": 50.0, "RssFile": 50.0}


def test_server_memory_reads_a_running_process():
    server = types.SimpleNamespace(proc=types.SimpleNamespace(pid=os.getpid()),
                                   lines=["x: loaded packed weights from cache /c in 3.0 s\n", "other\n"])
    memory = peers.ServerMemory()
    with memory(server):
        pass
    figures = memory.figures
    assert figures["peak_rss_mb"] >= figures["rss_at_end_mb"] > 0
    assert figures["peak_rss_during_load_mb"] > 0
    assert memory.log_lines == ["x: loaded packed weights from cache /c in 3.0 s"]


def test_targets():
    rows = [{"system": "llama-server", "clients": 1, "tokens_per_s": 4.0},
            {"system": "chat.v1", "clients": 1, "tokens_per_s": 6.0},
            {"system": "llama-server", "clients": 16, "tokens_per_s": 10.0}]
    assert peers.targets(rows) == {"C1_chat_over_llama": {"value": 1.5, "target": ">= 1.5"},
                                   "C16_chat_over_llama": {"value": None, "target": ">= 2.0"}}
