"""scripts/bench_gpu.py runs end to end (on CPU here, one layer of ChatGLM2-6B's shape: CI has no GPU)."""

from __future__ import annotations

import json

import pytest

from scripts import bench_gpu


@pytest.mark.slow
def test_bench_gpu_runs_on_cpu_and_writes_its_figures(tmp_path):
    out = tmp_path / "gpu.json"
    result = bench_gpu.main(["--device", "cpu", "--dtype", "float32", "--layers", "1", "--streams", "1", "2",
                             "--new-tokens", "3", "--single-steps", "3", "--capacity", "256", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["weight_gb_per_token"] > 1.0  # the real vocabulary and hidden size: 2 x 65024 x 4096 floats
    eager = result["modes"]["eager"]
    assert eager["single_stream_tok_s"] > 0 and 0 < eager["single_stream_of_roofline"]
    assert set(eager["engine"]) == {"1", "2"}
    for streams in eager["engine"].values():
        assert streams["tok_s"] > 0 and 0 < streams["ttft_p50_s"] <= streams["ttft_max_s"]
    assert eager["runner_build_s"] >= 0 and eager["peak_memory_gb"] is None  # no GPU memory to report
    assert set(result["modes"]) == {"eager"}  # graphs and compiled-graphs: CUDA only
    assert result["quantized"].startswith("none")


def test_no_cuda_device_says_so(monkeypatch):
    monkeypatch.setattr(bench_gpu.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench_gpu.main(["--device", "cuda"])
