"""scripts/gpu_check.sh --dry-run: the GPU check's steps on the CPU, so the script a lent GPU machine runs cannot
rot (CI has no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_and_writes_its_files(tmp_path):
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in (tmp_path / "tests.log").read_text()
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert result["modes"]["eager"]["single_stream_tok_s"] > 0
    assert "torch" in (tmp_path / "machine.txt").read_text()
