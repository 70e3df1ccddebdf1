"""What the callers' sampling set costs: the same closed-loop StreamChat load on one server, plain greedy against
every stream under a JSON schema, against presence/frequency penalties plus a logit_bias on every row, and
against the server's default sampling (temperature 0.95, top_p 0.7: what a caller who sets nothing gets).

    python -m bench.sampling_cost                    # C=1 (12 rounds) and C=16 (4 rounds), 64 tokens a request
    python -m bench.sampling_cost --clients 16 --rounds 6

Each round runs the three variants back to back, in a rotating order (at C=1 a round is one request of each), and
a variant's ratio is the median over rounds of its tok/s over the plain run of the same round: this VM's speed
drifts by 20 % within minutes, and neighbouring runs share the drift. Every answer is exactly --tokens long: the
plain, penalized and default-sampled ones ignore EOS, and the schema asks for at least 400 array items, so the
constrained ones end by length too (checked).
The mask cost per row per step is read from the server's /metrics (chat_constraint_mask_seconds_total over
chat_constraint_masked_rows_total). Writes bench/results/sampling_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from chat.v1 import chat_pb2

from bench import report as results
from bench.cpu import cpu_flags, cpu_name
from bench.server_process import ServerProcess
from client.chat_client import AsyncChatClient

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "scores"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                                    "minItems": 400}}}
VARIANTS = {
    "plain": {"temperature": 0.0, "ignore_eos": True},
    "json_schema": {"temperature": 0.0, "constraint": chat_pb2.Constraint(json_schema=json.dumps(SCHEMA))},
    "penalties": {"temperature": 0.0, "ignore_eos": True, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                  "logit_bias": {token: (2.0 if token % 2 else -2.0) for token in range(100, 132)}},
    "defaults": {"ignore_eos": True},  # temperature and top_p unset: the server's 0.95 and 0.7
}


async def closed_loop(address: str, clients: int, requests: int, tokens: int, params: dict) -> tuple[int, int]:
    """(tokens generated, answers shorter than `tokens`)."""
    async with AsyncChatClient(address, timeout=600, retry=None) as client:
        async def one_client(c: int) -> tuple[int, int]:
            done = short = 0
            for r in range(requests):
                got = 0
                async for chunk in client.stream_chunks(f"List the scores of player {c * 100 + r} as JSON.",
                                                        max_new_tokens=tokens, **params):
                    got += chunk.token_count
                done, short = done + got, short + (got < tokens)
            return done, short

        counts = await asyncio.gather(*(one_client(c) for c in range(clients)))
    return sum(d for d, _ in counts), sum(s for _, s in counts)


def mask_counters(port: int) -> tuple[float, float]:
    """(chat_constraint_mask_seconds_total, chat_constraint_masked_rows_total) from /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    def value(name: str) -> float:
        found = re.search(rf"^{name}_total\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    return value("chat_constraint_mask_seconds"), value("chat_constraint_masked_rows")


async def measure(server: ServerProcess, variant: str, clients: int, args) -> dict:
    seconds_before, rows_before = mask_counters(server.http_port)
    started = time.perf_counter()
    generated, short = await closed_loop(server.address, clients, args.requests, args.tokens, VARIANTS[variant])
    seconds = time.perf_counter() - started
    mask_seconds, masked_rows = (a - b for a, b in zip(mask_counters(server.http_port),
                                                        (seconds_before, rows_before), strict=True))
    return {"variant": variant, "clients": clients, "tokens": generated, "short_answers": short,
            "seconds": round(seconds, 3), "tokens_per_s": round(generated / seconds, 2),
            "masked_rows": int(masked_rows),
            "mask_ms_per_row_step": round(1000 * mask_seconds / masked_rows, 4) if masked_rows else None}


def over_plain(speed: dict, rounds: list[int], variant: str) -> float:
    """The median over rounds of the variant's tok/s over the plain run of the same round."""
    return round(statistics.median(speed[k, variant] / speed[k, "plain"] for k in rounds), 3)


def summarize(runs: list[dict], clients: list[int]) -> dict:
    summary = {}
    for c in clients:
        mine = [r for r in runs if r["clients"] == c]
        speed = {(r["round"], r["variant"]): r["tokens_per_s"] for r in mine}
        rounds = sorted({r["round"] for r in mine})

        masks = [r["mask_ms_per_row_step"] for r in mine if r["mask_ms_per_row_step"]]
        summary[f"C{c}"] = {"tokens_per_s_median": {v: round(statistics.median(speed[k, v] for k in rounds), 2)
                                                    for v in VARIANTS},
                            "json_schema_over_plain": over_plain(speed, rounds, "json_schema"),
                            "penalties_over_plain": over_plain(speed, rounds, "penalties"),
                            "defaults_over_plain": over_plain(speed, rounds, "defaults"),
                            "rounds": len(rounds),
                            "mask_ms_per_row_step": round(statistics.fmean(masks), 4) if masks else None}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=1, help="per client and run")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="rounds at more than one client")
    parser.add_argument("--rounds-one", type=int, default=12, help="rounds at one client")
    parser.add_argument("--server-arg", action="append", default=[], help="extra chat-server flag (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/sampling_cost.json")
    args = parser.parse_args()
    machine = {"cpu": cpu_name(), "flags": cpu_flags()}
    print(f"machine: {json.dumps(machine)}", flush=True)
    runs = []
    with ServerProcess("--log-level", "INFO", "--max-batch-size", str(max(args.clients)), *args.server_arg) as server:
        server.wait_serving(timeout=600)
        for clients in args.clients:
            asyncio.run(closed_loop(server.address, clients, 1, 8, VARIANTS["json_schema"]))  # warm-up
            order = list(VARIANTS)
            for round_ in range(args.rounds_one if clients == 1 else args.rounds):
                for variant in order[round_ % len(order):] + order[:round_ % len(order)]:
                    run = {"round": round_, **asyncio.run(measure(server, variant, clients, args))}
                    print(json.dumps(run), flush=True)
                    runs.append(run)
        server.stop()
    summary = summarize(runs, args.clients)
    print(json.dumps(summary, indent=1))
    print(f"machine: {json.dumps(machine)}")
    report = {"machine": machine, "requests_per_client": args.requests, "tokens": args.tokens,
              "schema": SCHEMA, "server_args": args.server_arg, "runs": runs, "summary": summary}
    results.save("sampling_cost", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
