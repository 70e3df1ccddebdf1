"""Where a benchmark's results go: bench/results/<kind>.json holds the latest run in full, and
bench/results/<kind>-history.jsonl gets one line per run (its time, the CPU and its flags, and the report without
long sample lists), so that the history of a benchmark is one appended file, not a new committed file per run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.cpu import cpu_flags, cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
MAX_LISTED = 32  # longer lists (RSS samples, per-request times) stay out of the history line


def compact(value):
    """`value` without lists longer than MAX_LISTED, at any depth."""
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items() if not (isinstance(v, list) and len(v) > MAX_LISTED)}
    if isinstance(value, list):
        return [compact(v) for v in value]
    return value


def history_line(report: dict, at: str | None = None) -> str:
    return json.dumps({"at": at or time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_name(), "cpu_flags": cpu_flags(),
                       **compact(report)}, ensure_ascii=False)


def save(kind: str, report: dict, out: Path | None = None, *, history: bool = True) -> Path:
    """Write `report` to `out` (default bench/results/<kind>.json) and, with `history`, append its line to
    bench/results/<kind>-history.jsonl; print and return where it went."""
    out = out or RESULTS / f"{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if history:
        with open(RESULTS / f"{kind}-history.jsonl", "a", encoding="utf-8") as lines:
            lines.write(history_line(report) + "\n")
    print(f"wrote {out}")
    return out
