#!/usr/bin/env bash
# The GPU check (issue 20): one command for a lent GPU machine (torch installed, no network), at most ~8 minutes,
# everything it finds written under $OUT (a new temporary folder if unset).
#
#   scripts/gpu_check.sh            on a GPU: the CUDA-relevant tests with CHAT_TEST_DEVICE=cuda (device choice,
#                                   sampling, the engine, step graphs, a real server answering "Paris"), then
#                                   scripts/bench_gpu.py on ChatGLM2-6B's shape with random weights built on the
#                                   GPU itself (12.5 GB in bf16: never carried): eager, CUDA graphs, and inductor +
#                                   CUDA graphs side by side
#   scripts/gpu_check.sh --dry-run  the same steps on the CPU, small (the test suite runs it, so it cannot rot)
#
# Exit status 0 when every step passed. $OUT gets machine.txt, tests.log, bench_gpu.log and bench_gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
if [ "${1:-}" = "--dry-run" ]; then
    device=cpu
    tests=(tests/models/test_device.py tests/service/engine/test_sampling.py)
    bench=(--device cpu --dtype float32 --layers 1 --streams 1 2 --new-tokens 3 --single-steps 3 --capacity 256)
else
    device=cuda
    tests=(tests/models/test_device.py tests/service/engine tests/service/grpc/test_servicer.py)
    bench=(--device cuda --dtype bfloat16 --streams 1 16 64 --new-tokens 64)
fi
status=0
{
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
    nvidia-smi 2>/dev/null || echo "no nvidia-smi"
    grep -m1 "model name" /proc/cpuinfo || true
} > "$OUT/machine.txt" 2>&1
echo "tests on $device:"
CHAT_TEST_DEVICE=$device timeout 180 "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" > "$OUT/tests.log" 2>&1 \
    || status=1
tail -n 1 "$OUT/tests.log"
echo "bench_gpu on $device:"
timeout 300 "$PY" -m scripts.bench_gpu "${bench[@]}" --out "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1 \
    || status=1
tail -n 5 "$OUT/bench_gpu.log"
echo "results in $OUT (status $status)"
exit $status
