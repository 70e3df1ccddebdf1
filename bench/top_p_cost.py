"""What top-p costs a sampling step: the nucleus found among the best NUCLEUS_CANDIDATES tokens (what the engine
does) against a sort of the whole vocabulary (what it did before), side by side in one run.

    python -m bench.top_p_cost                     # the default model's vocabulary (49152), 1 and 16 rows

Logits are random and normal, at the server's default temperature 0.95 and top_p 0.7, at two spreads: a
standard deviation of 3 gives a nucleus of 150 to 230 tokens, wider than the first shortlist (128), and one of
8 a few tokens, as a real model's usually is (SmolLM2's: 2 at the median, 58 at most over 200 steps). Every
timing is the median of --repeats calls after a warm-up, and the two paths must keep the same tokens (checked).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.cpu import cpu_flags, cpu_name
from service.engine.request import SamplingParams
from service.engine.sampling import Row, cut, filter_logits


def timed(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(rows: int, vocab: int, spread: float, repeats: int) -> tuple[int, float, float] | None:
    """(tokens kept a row, seconds of the shortlist path, seconds of the whole-vocabulary sort) at `rows` rows;
    None if the two kept different tokens."""
    params = SamplingParams(max_new_tokens=64, temperature=0.95, top_p=0.7, top_k=0, repetition_penalty=1.0)
    logits = torch.randn(rows, vocab) * spread
    batch = [Row(params)] * rows
    scaled = logits / 0.95
    whole, top_p = [vocab] * rows, [0.7] * rows
    shortlist = filter_logits(logits, batch).logits
    if not torch.equal(torch.isinf(shortlist), torch.isinf(cut(scaled, whole, top_p, vocab).logits)):
        return None
    return (round(int(torch.isfinite(shortlist).sum()) / rows), timed(lambda: filter_logits(logits, batch), repeats),
            timed(lambda: cut(scaled, whole, top_p, vocab), repeats))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--spreads", type=float, nargs="+", default=[8.0, 3.0], help="standard deviations")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU {cpu_name()} ({' '.join(cpu_flags())}), torch threads {torch.get_num_threads()}, vocabulary "
          f"{args.vocab}, temperature 0.95, top_p 0.7:")
    for spread in args.spreads:
        for rows in args.rows:
            found = compare(rows, args.vocab, spread, args.repeats)
            if found is None:
                print(f"  deviation {spread:g}, {rows} rows: the two paths kept different tokens")
                return 1
            kept, now, before = found
            print(f"  deviation {spread:g}, {rows:3d} rows: {kept} tokens kept a row; shortlist {now * 1e3:.2f} ms, "
                  f"whole-vocabulary sort {before * 1e3:.2f} ms: {before / now:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
