"""`make bench-peers-chatglm2`: chat.v1 against llama.cpp's `llama-server` on a ChatGLM2-6B-shaped checkpoint.

    python -m bench.peers_chatglm2 --checkpoint /tmp/chatglm2-6b-random
    python -m bench.peers_chatglm2 --clients 1 --new-tokens 16          # a shorter run

The checkpoint is `scripts/make_random_chatglm2.py`'s (made there first when `--checkpoint` does not exist):
THUDM's layout and shapes, float16, random weights. Each server gets its own int4 form of the same weights:

* llama-server: llama.cpp's own converter (`convert_hf_to_gguf.py`, with its `gguf-py` on PYTHONPATH) writes an
  F16 GGUF, and `llama-quantize` makes it Q4_0, both from the `llama-cpp-python` sdist `make bench-peers` builds.
  The converter reads an overlay of the checkpoint (symlinks to its files, the checkpoint itself untouched):
  its ChatGLM vocabulary is read through `AutoTokenizer(trust_remote_code=True)`, which THUDM's
  `tokenization_chatglm.py` cannot serve on transformers 5, so the overlay carries
  `bench/chatglm_tokenizer_for_llama.py` instead, built from the checkpoint's `tokenizer.model`; and it reads
  that SentencePiece vocabulary only for a `_name_or_path` naming THUDM/chatglm3-6b (any other ChatGLM goes to
  GLM-4's BPE path and fails), so the overlay's config.json names it. ChatGLM2 and ChatGLM3 have the same
  architecture and tokenizer layout. The GGUF is kept under `--work-dir` and reused while the checkpoint's
  files and the llama.cpp source are the same.
* chat.v1: `chat-server --model CHECKPOINT --quantize int4` (quantized as it loads, or read back from the
  packed-weight cache).

The load is `bench/bench_peers.py`'s: C closed-loop clients, the 8 prompts of bench/prompts.py, greedy, EOS
ignored, exactly `--new-tokens` tokens a request, the two servers started fresh for each client count, one
after the other, never at once. llama-server has no ChatGLM2 chat template, so it gets the prompt ids chat.v1
builds (`[gMASK] sop` + `[Round 1]\\n\\n问：...\\n\\n答：`, through the same tokenizer class) on /completion; its
own tokenization of the prompt texts is checked against ours and recorded. Beside tok/s, TTFT and ITL, each
row has the server's peak RSS: VmHWM from /proc (its whole life: loading, warm-up and the load) and the RSS
polled during the timed load, plus its anonymous and file-backed parts at the end (llama-server maps the GGUF).
Random weights decode to gibberish, most of it padding ids, so answers are counted in tokens, not text.
Writes bench/results/peers_chatglm2.json and a line of bench/results/peers_chatglm2-history.jsonl. Never in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from bench import report
from bench.bench_peers import (
    DEFAULT_LLAMA_SERVER,
    LlamaServer,
    describe_checkout,
    llama_version,
    machine,
    measure_chat,
    measure_llama,
    print_summary,
    ratio,
)
from bench.prompts import PROMPTS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LLAMA_CACHE = ROOT / ".cache" / "llama.cpp"
LLAMA_SOURCE = LLAMA_CACHE / "src" / "vendor" / "llama.cpp"
DEFAULT_QUANTIZE = LLAMA_CACHE / "build" / "bin" / "llama-quantize"
DEFAULT_WORK_DIR = ROOT / ".cache" / "peers-chatglm2"
TOKENIZER_MODULE = Path(__file__).resolve().parent / "chatglm_tokenizer_for_llama.py"
KIND = "peers_chatglm2"
QUANT = "Q4_0"
# The converter reads a ChatGLM SentencePiece vocabulary (set_vocab_chatglm3) only for this _name_or_path.
CONVERTER_NAME_OR_PATH = "THUDM/chatglm3-6b"
# Files of the checkpoint the overlay replaces; THUDM's *.py (remote code) are left out altogether.
REPLACED = {"config.json", "tokenizer_config.json"}
TARGETS = {1: 1.5, 16: 2.0}  # issue 18: chat.v1 tok/s over llama-server tok/s, at least


# ---- the checkpoint as llama.cpp's converter reads it --------------------------------------------------------


def overlay_config(config: dict) -> dict:
    """The checkpoint's config.json for the converter: the same, with a _name_or_path that takes its ChatGLM
    SentencePiece path (the original name is kept beside it)."""
    return {**config, "_name_or_path": CONVERTER_NAME_OR_PATH,
            "_chat_v1_original_name_or_path": config.get("_name_or_path")}


def overlay_tokenizer_config(config: dict) -> dict:
    """tokenizer_config.json pointing AutoTokenizer at tokenization_chatglm.ChatGLMTokenizer (our module)."""
    return {**config, "tokenizer_class": "ChatGLMTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}


def make_overlay(checkpoint: Path, out: Path) -> Path:
    """`out`: a symlink to each of the checkpoint's files, except the two configs (rewritten) and any *.py;
    plus our tokenizer as tokenization_chatglm.py. Rebuilt from scratch; the checkpoint is only read."""
    checkpoint = checkpoint.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in sorted(checkpoint.iterdir()):
        if path.is_file() and path.name not in REPLACED and path.suffix != ".py":
            (out / path.name).symlink_to(path)
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    (out / "config.json").write_text(json.dumps(overlay_config(config), indent=2), encoding="utf-8")
    tokenizer_config_file = checkpoint / "tokenizer_config.json"
    tokenizer_config = (json.loads(tokenizer_config_file.read_text(encoding="utf-8"))
                        if tokenizer_config_file.is_file() else {})
    (out / "tokenizer_config.json").write_text(json.dumps(overlay_tokenizer_config(tokenizer_config), indent=2),
                                               encoding="utf-8")
    shutil.copyfile(TOKENIZER_MODULE, out / "tokenization_chatglm.py")
    return out


def check_dense(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_bit"):
        raise SystemExit(f"{checkpoint}: quantization_bit {config['quantization_bit']}: llama.cpp's converter needs "
                         f"the dense (float16) checkpoint (make_random_chatglm2 --variant 6b)")


def identity(checkpoint: Path) -> list[list]:
    """What the GGUF is made from: the checkpoint's files (name, size, mtime), our tokenizer module's hash and
    the llama.cpp source (the sdist's name)."""
    files = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(checkpoint.resolve().iterdir())
             if p.is_file()]
    tokenizer = hashlib.sha256(TOKENIZER_MODULE.read_bytes()).hexdigest()[:16]
    source = LLAMA_CACHE / "SOURCE"
    return [files, ["tokenizer", tokenizer], ["llama.cpp", source.read_text().strip() if source.exists() else ""],
            ["quant", QUANT]]


def converter_command(python: str, overlay: Path, outfile: Path, name: str) -> list[str]:
    return [python, str(LLAMA_SOURCE / "convert_hf_to_gguf.py"), str(overlay), "--outtype", "f16",
            "--outfile", str(outfile), "--model-name", name]


def quantize_command(binary: Path, f16: Path, out: Path, threads: int) -> list[str]:
    return [str(binary), str(f16), str(out), QUANT, str(threads)]


def run_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run `command` at nice 19, its output to `log`; seconds it took. Raises with the log's tail on failure."""
    print(f"  $ {' '.join(command)}  (log: {log})", flush=True)
    started = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run(["nice", "-n", "19", *command], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})})
    if done.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"{command[0]} failed with {done.returncode}; the end of {log}:\n{tail}")
    return time.monotonic() - started


def ensure_gguf(checkpoint: Path, work: Path, quantize_binary: Path, threads: int, keep_f16: bool) -> tuple:
    """The Q4_0 GGUF of `checkpoint` (made now, or reused when made from the same files), and how it was made."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"chatglm2-{QUANT.lower()}.gguf"
    manifest_file = work / "manifest.json"
    wanted = identity(checkpoint)
    if out.is_file() and manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("identity") == wanted:
            print(f"reusing {out} ({out.stat().st_size / 1e9:.2f} GB), made from the same checkpoint", flush=True)
            return out, {**manifest, "reused": True}
    if not quantize_binary.is_file():
        raise SystemExit(f"no llama-quantize at {quantize_binary}: bench/build_llama_server.sh llama-server "
                         f"llama-quantize")
    print(f"converting {checkpoint} with llama.cpp's converter, then {QUANT} (a few minutes)", flush=True)
    manifest_file.unlink(missing_ok=True)
    overlay = make_overlay(checkpoint, work / "hf")
    f16 = work / "chatglm2-f16.gguf"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(LLAMA_SOURCE / "gguf-py"), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    convert_s = run_logged(converter_command(sys.executable, overlay, f16, checkpoint.resolve().name),
                           work / "convert.log", env)
    quantize_s = run_logged(quantize_command(quantize_binary, f16, out, threads), work / "quantize.log")
    manifest = {"identity": wanted, "gguf": str(out), "gguf_bytes": out.stat().st_size,
                "f16_bytes": f16.stat().st_size, "convert_s": round(convert_s, 1), "quantize_s": round(quantize_s, 1),
                "converter": converter_command("python", overlay, f16, checkpoint.resolve().name),
                "quantize": quantize_command(quantize_binary, f16, out, threads)}
    if not keep_f16:
        f16.unlink()
    manifest_file.write_text(json.dumps(manifest, indent=2))
    print(f"wrote {out} ({out.stat().st_size / 1e9:.2f} GB): converter {convert_s:.0f} s, llama-quantize "
          f"{quantize_s:.0f} s", flush=True)
    return out, {**manifest, "reused": False}


def ensure_checkpoint(checkpoint: Path) -> None:
    if (checkpoint / "config.json").is_file():
        return
    print(f"no checkpoint at {checkpoint}: making the ChatGLM2-6B-shaped random one there (12.5 GB)", flush=True)
    subprocess.run([sys.executable, "-m", "scripts.make_random_chatglm2", "--out", str(checkpoint)], cwd=ROOT,
                   check=True)


# ---- prompts: the ids chat.v1 prefills, and llama.cpp's own tokenization of the same texts -------------------


def chat_prompts(checkpoint: Path):
    """chat.v1's tokenizer for this checkpoint, each prompt's ids as chat.v1 builds them, and each prompt's
    templated text (no `[gMASK] sop`)."""
    from service.models.chatglm2_tokenizer import ChatGLM2Tokenizer, build_prompt

    tokenizer = ChatGLM2Tokenizer(checkpoint / "tokenizer.model")
    ids = [tokenizer.encode_chat(prompt, (), None) for prompt in PROMPTS]
    texts = [build_prompt(prompt, ()) for prompt in PROMPTS]
    return tokenizer, ids, texts


def compare_tokenization(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How llama.cpp's ids for the templated texts compare with ours (prefix left out of both)."""
    same = [a == b for a, b in zip(ours, theirs, strict=True)]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    return {"prompts": len(same), "identical": sum(same),
            "first_difference": None if first is None else {"prompt": first, "chat_v1": ours[first],
                                                            "llama_cpp": theirs[first]}}


async def llama_tokenization(binary: Path, gguf: Path, texts: list[str], args, log: Path) -> list[list[int]]:
    """llama-server's /tokenize of each text (no special tokens added), from a short-lived server."""
    server = LlamaServer(binary, gguf, 1, args, log)
    found = []
    try:
        async with aiohttp.ClientSession() as session:
            await server.wait_ready(session)
            for text in texts:
                body = {"content": text, "add_special": False}
                async with session.post(f"{server.url}/tokenize", json=body) as response:
                    found.append((await response.json())["tokens"])
    finally:
        server.stop()
    return found


# ---- memory -------------------------------------------------------------------------------------------------


def parse_status(text: str) -> dict[str, float]:
    """MB of /proc/<pid>/status's VmHWM (peak RSS), VmRSS, RssAnon and RssFile."""
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            found[key] = round(int(value.split()[0]) / 1024, 1)  # kB
    return found


class ServerMemory:
    """The `watch` bench_peers' measure_llama / measure_chat enter around the timed load: polls the server's RSS
    meanwhile (bench_batching's PeakRss), then reads its /proc status while it still runs."""

    def __init__(self):
        self.figures: dict = {}
        self.log_lines: list[str] = []

    def __call__(self, server):
        self._server = server
        return self

    def __enter__(self):
        from bench.bench_batching import PeakRss

        self._rss = PeakRss(self._server.proc.pid).__enter__()
        return self

    def __exit__(self, *exc):
        self._rss.__exit__(*exc)
        status = parse_status(Path(f"/proc/{self._server.proc.pid}/status").read_text())
        self.figures = {"peak_rss_mb": status.get("VmHWM"), "peak_rss_during_load_mb": round(self._rss.peak_mb, 1),
                        "rss_at_end_mb": status.get("VmRSS"), "rss_anon_at_end_mb": status.get("RssAnon"),
                        "rss_file_at_end_mb": status.get("RssFile")}
        # chat.v1's lines on how it got its weights (quantized at load, or from the packed-weight cache)
        self.log_lines = [line.strip()[-300:] for line in getattr(self._server, "lines", [])
                          if "packed weights" in line or "loaded" in line][:6]
        return False


# ---- the run ------------------------------------------------------------------------------------------------


def targets(rows: list[dict]) -> dict:
    """chat.v1 tok/s over llama-server's at each client count of TARGETS, with the target."""
    by = {(r["system"], r["clients"]): r["tokens_per_s"] for r in rows}
    return {f"C{c}_chat_over_llama": {"value": ratio(by.get(("chat.v1", c)), by.get(("llama-server", c))),
                                      "target": f">= {goal}"} for c, goal in TARGETS.items()}


def print_table(rows: list[dict]) -> None:
    llama = {r["clients"]: r for r in rows if r["system"] == "llama-server"}
    print(f"{'C':>3} {'system':<13}{'tok/s':>8}{'x llama':>9}{'TTFT p50':>10}{'ITL p50':>9}{'peak RSS MB':>13}"
          f"{'RSS in load':>13}{'errors':>8}")
    for r in rows:
        base = llama.get(r["clients"], {})
        x = ratio(r["tokens_per_s"], base.get("tokens_per_s"))
        print(f"{r['clients']:>3} {r['system']:<13}{r['tokens_per_s']:>8.2f}{x if x is not None else '-':>9}"
              f"{r['ttft_p50_s']:>10.3f}{r['itl_p50_s']:>9.4f}{r.get('peak_rss_mb') or 0:>13.0f}"
              f"{r.get('peak_rss_during_load_mb') or 0:>13.0f}{r['errors']:>8}")


def save(result: dict, out: Path | None, complete: bool) -> Path:
    result.update(complete=complete, targets=targets(result["rows"]))
    result["machine"]["load_average_at_end"] = os.getloadavg()
    return report.save(KIND, result, out, history=complete)


async def run(args) -> dict:
    checkpoint = args.checkpoint
    ensure_checkpoint(checkpoint)
    check_dense(checkpoint)
    gguf, conversion = ensure_gguf(checkpoint, args.work_dir, args.llama_quantize, args.threads, args.keep_f16)
    _tokenizer, prompt_ids, texts = chat_prompts(checkpoint)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    theirs = await llama_tokenization(args.llama_server, gguf, texts, args,
                                      RESULTS / f"{KIND}-{stamp}-llama-tokenize.log")
    tokenization = compare_tokenization([ids[2:] for ids in prompt_ids], theirs)
    args.server_arg = ["--model", str(checkpoint), "--quantize", "int4", *args.server_arg]
    result = {"stamp": stamp, "machine": machine(), "checkpoint": str(checkpoint), "gguf": str(gguf),
              "conversion": conversion, "new_tokens": args.new_tokens, "rounds": args.rounds, "prompts": PROMPTS,
              "prompt_tokens": [len(ids) for ids in prompt_ids], "llama_tokenization": tokenization,
              "llama_server": {"binary": str(args.llama_server), "version": llama_version(args.llama_server),
                               "source": (LLAMA_CACHE / "SOURCE").read_text().strip()
                               if (LLAMA_CACHE / "SOURCE").exists() else "", "commands": {}},
              "chat_v1": {"source": f"checkout {describe_checkout()}", "server_args": [], "serving": "",
                          "weights": {}}, "rows": []}
    m = result["machine"]
    print(f"checkpoint {checkpoint}; {gguf.name} {gguf.stat().st_size / 1e9:.2f} GB; prompts of "
          f"{min(result['prompt_tokens'])}-{max(result['prompt_tokens'])} tokens; {args.new_tokens} greedy tokens, "
          f"{args.rounds} requests per client; clients {args.clients}", flush=True)
    print(f"llama.cpp's tokenization of the prompt texts: {tokenization['identical']} of "
          f"{tokenization['prompts']} identical to chat.v1's", flush=True)
    print(f"CPU {m['cpu']}, {m['cores']} cores, flags {' '.join(m['cpu_flags'])}", flush=True)
    for clients in args.clients:
        log_path = RESULTS / f"{KIND}-{stamp}-llama-server-C{clients}.log"
        load = {"llama-server": os.getloadavg()[0]}
        memory = {"llama-server": ServerMemory(), "chat.v1": ServerMemory()}
        llama, command = await measure_llama(args.llama_server, gguf, prompt_ids, clients, args, log_path,
                                             watch=memory["llama-server"])
        result["llama_server"]["commands"][str(clients)] = command
        load["chat.v1"] = os.getloadavg()[0]
        chat, server_args, serving = await measure_chat(clients, args, ROOT, watch=memory["chat.v1"])
        result["chat_v1"].update(server_args=server_args, serving=serving)
        result["chat_v1"]["weights"][str(clients)] = memory["chat.v1"].log_lines
        for figures in (llama, chat):
            row = (figures.summary(args.new_tokens) | memory[figures.system].figures
                   | {"load_average_1m_before": round(load[figures.system], 2)})
            row.pop("tokenizer_tokens"), row.pop("tokenizer_tokens_per_s")  # random weights: no text to count
            result["rows"].append(row)
            print(f"C={clients:<3} {row['system']:<13} {row['tokens_per_s']:7.2f} tok/s  TTFT p50 "
                  f"{row['ttft_p50_s']:.3f}s  ITL p50 {row['itl_p50_s']:.4f}s  peak RSS {row['peak_rss_mb']} MB "
                  f"(during the load {row['peak_rss_during_load_mb']} MB)  errors {row['errors']}  "
                  f"(load average {row['load_average_1m_before']})", flush=True)
        save(result, args.out, complete=False)
    save(result, args.out, complete=True)
    return result


def main(argv: list[str] | None = None) -> int:
    from scripts.make_random_chatglm2 import DEFAULT_OUT

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_OUT,
                        help="a dense ChatGLM2-6B-layout checkpoint; made with make_random_chatglm2 if missing")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="where the overlay and the GGUF are made and kept")
    parser.add_argument("--keep-f16", action="store_true", help="keep the intermediate F16 GGUF (12.5 GB)")
    parser.add_argument("--llama-server", type=Path, default=DEFAULT_LLAMA_SERVER)
    parser.add_argument("--llama-quantize", type=Path, default=DEFAULT_QUANTIZE)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=1, help="requests per client, one after another")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="llama-server -t / -tb, llama-quantize threads")
    parser.add_argument("--ctx-per-slot", type=int, default=512, help="llama-server context per slot (-c C*this)")
    parser.add_argument("--request-timeout", type=float, default=900)
    parser.add_argument("--server-arg", action="append", default=[], help="extra chat-server flag, repeatable")
    parser.add_argument("--llama-arg", action="append", default=[], help="extra llama-server flag, repeatable")
    parser.add_argument("--out", type=Path, default=None, help=f"default: bench/results/{KIND}.json")
    args = parser.parse_args(argv)
    if not args.llama_server.is_file():
        parser.error(f"no llama-server at {args.llama_server}: bench/build_llama_server.sh llama-server "
                     f"llama-quantize")

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the servers on the way out
    return print_summary(asyncio.run(run(args)), print_table)


if __name__ == "__main__":
    sys.exit(main())
