"""`make bench-prefix`: 16 callers with one long system prompt, against the same load on an earlier engine.

    python -m bench.shared_prefix                          # this checkout against --baseline-commit
    python -m bench.shared_prefix --baseline-commit none   # this checkout alone

Each server (this checkout's, and chat.v1 at `--baseline-commit` exported with `git archive`, by default the
slot engine before paged KV) is started fresh with default flags, gets one warm call with the shared system
prompt (~1500 tokens), then `--callers` concurrent StreamChat calls with the same system prompt and different
questions, greedy, `--new-tokens` each. Measured per server: time to first token (p50, p95) of the concurrent
calls, and the prompt tokens the engine computed for them (looked up minus found in the prefix cache, from
/metrics). The servers run one after the other, `--rounds` times interleaved (A B A B), so drift hits both.
Prints the ratios and the issue's targets with the CPU and its flags; writes bench/results/shared_prefix.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench import report
from bench.bench_peers import export_commit, load_tokenizer, start_chat_server
from bench.cpu import cpu_flags, cpu_name
from client.chat_client import AsyncChatClient

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16
QUESTIONS = [f"In one sentence, what does rule {n} ask of me?" for n in range(1, 33)]


def system_prompt(rules: int) -> str:
    return " ".join(f"Rule {n}: answer the user's question briefly, politely and with facts you are sure of, "
                    f"never inventing a source." for n in range(1, rules + 1))


def counters(http_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


async def ttft(client: AsyncChatClient, question: str, system: str, new_tokens: int) -> tuple[float, int]:
    started, first, prompt_tokens = time.perf_counter(), None, 0
    async for chunk in client.stream_chunks(question, system=system, temperature=0.0, max_new_tokens=new_tokens,
                                            ignore_eos=True):
        if chunk.token_count and first is None:
            first = time.perf_counter() - started
        if chunk.HasField("usage"):
            prompt_tokens = chunk.usage.prompt_tokens
    return first, prompt_tokens


async def one_load(address: str, http_port: int, args) -> dict:
    system = system_prompt(args.rules)
    async with AsyncChatClient(address, timeout=600) as client:
        _, warm_tokens = await ttft(client, "Hello.", system, 4)
        before = counters(http_port)
        results = await asyncio.gather(*(ttft(client, QUESTIONS[i % len(QUESTIONS)], system, args.new_tokens)
                                         for i in range(args.callers)))
        after = counters(http_port)
    times = sorted(t for t, _ in results)
    prompts = [n for _, n in results]

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    computed = delta("chat_prefix_cache_queries_total") - delta("chat_prefix_cache_hits_total")
    return {"warm_call_prompt_tokens": warm_tokens, "prompt_tokens": sum(prompts),
            "computed_prompt_tokens": int(computed),
            "ttft_p50_s": round(statistics.median(times), 4),
            "ttft_p95_s": round(statistics.quantiles(times, n=20)[18], 4) if len(times) > 1 else times[0]}


def question_tokens(args) -> int:
    """Prompt tokens of the callers beyond the part all their prompts share (the model's own tokenizer)."""
    from service.models.loader import default_model_file

    _, chat = load_tokenizer(default_model_file())
    system = system_prompt(args.rules)
    prompts = [chat.encode_chat(QUESTIONS[i % len(QUESTIONS)], (), system) for i in range(args.callers)]
    shared = 0
    while all(len(p) > shared and p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    return sum(len(p) - shared for p in prompts)


def run_server(source: Path, args) -> dict:
    server = start_chat_server(["--log-level", "INFO"], source)
    try:
        return asyncio.run(one_load(server.address, server.http_port, args))
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--rules", type=int, default=60, help="sentences of the system prompt (~25 tokens each)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-commit", default="b212694", help="'none': this checkout alone")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/shared_prefix.json")
    args = parser.parse_args()
    sources = {"this checkout": ROOT}
    if args.baseline_commit != "none":
        source, sha = export_commit(args.baseline_commit)
        sources[f"baseline {sha[:7]}"] = source
    runs: dict[str, list[dict]] = {label: [] for label in sources}
    for i in range(args.rounds):
        for label, source in sources.items():
            runs[label].append(run_server(source, args))
            print(f"round {i} {label}: {runs[label][-1]}", flush=True)
    summary = {label: {"ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in rs),
                       "computed_prompt_tokens": min(r["computed_prompt_tokens"] for r in rs),
                       "prompt_tokens": rs[0]["prompt_tokens"]} for label, rs in runs.items()}
    ours = summary["this checkout"]
    questions = question_tokens(args)
    targets = {"computed_prompt_tokens": ours["computed_prompt_tokens"], "question_tokens": questions,
               "bound_questions_plus_a_block_each": questions + BLOCK * args.callers}
    line = (f"this checkout: TTFT p50 {ours['ttft_p50_s']:.3f} s, {ours['computed_prompt_tokens']} of "
            f"{ours['prompt_tokens']} prompt tokens computed")
    for label, figures in summary.items():
        if label != "this checkout":
            targets[f"ttft_p50_over_{label.split()[-1]}"] = round(ours["ttft_p50_s"] / figures["ttft_p50_s"], 3)
            line += (f"; {label}: TTFT p50 {figures['ttft_p50_s']:.3f} s, {figures['computed_prompt_tokens']} "
                     f"computed; ratio {targets[f'ttft_p50_over_{label.split()[-1]}']:.2f} (target <= 0.4)")
    print(f"{line}; CPU {cpu_name()} ({' '.join(cpu_flags())})")
    report.save("shared_prefix", {"callers": args.callers, "rules": args.rules, "new_tokens": args.new_tokens,
                                  "sources": {k: str(v) for k, v in sources.items()}, "runs": runs,
                                  "summary": summary, "targets": targets}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
