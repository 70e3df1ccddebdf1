#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama-cpp-python sdist on PyPI (its vendor/llama.cpp), for
# `make bench-peers`. Everything lives under .cache/llama.cpp/ in the repository; a second run with the same
# configuration reuses it (a changed configuration rebuilds incrementally in the same build folder).
# CPU only (no CUDA), no curl, no OpenSSL, no web UI, no network at build time, Release, for this machine's CPU.
# Low priority: nice -n 19, $JOBS jobs (default 2). Never run in CI: it downloads the sdist and takes from
# ~15 minutes (2 idle cores) to ~55 minutes (2 cores shared with other work).
#
# For this CPU: -DGGML_NATIVE=ON, except where /proc/cpuinfo lists AMX. -march=native then compiles ggml's AMX
# kernels, and on VMs that advertise AMX without enabling its register state (this project's machines), the first
# matmul dies with SIGSEGV at `ldtilecfg`. There the same instruction sets are named one by one, AMX left out.
# LLAMA_AMX=1 keeps -DGGML_NATIVE=ON on such a CPU anyway.
# Arguments: the cmake targets to build (default: llama-server; `make bench-peers-chatglm2` adds llama-quantize).
# Prints the path of each target's binary, one a line, in the order given (by default the llama-server binary).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="$ROOT/.cache/llama.cpp"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-2}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-}"   # empty: the newest sdist
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(llama-server)

cpu_args() {
    local flags
    flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
    if [[ "$flags" != *" amx_tile "* || "${LLAMA_AMX:-0}" == 1 ]]; then
        echo "-DGGML_NATIVE=ON"
        return
    fi
    local out="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pair
    for pair in sse4_2:SSE42 f16c:F16C fma:FMA bmi2:BMI2 avx:AVX avx2:AVX2 avx_vnni:AVX_VNNI avx512f:AVX512 \
                avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
        if [[ "$flags" == *" ${pair%%:*} "* ]]; then out+=" -DGGML_${pair#*:}=ON"; else out+=" -DGGML_${pair#*:}=OFF"; fi
    done
    echo "$out"
}

CONFIG="-DCMAKE_BUILD_TYPE=Release $(cpu_args) -DLLAMA_CURL=OFF -DGGML_CUDA=OFF -DBUILD_SHARED_LIBS=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \
-DLLAMA_USE_PREBUILT_UI=OFF"

built() {  # every target's binary is there, built with this configuration
    local target
    [[ -f "$CACHE/CONFIG" && "$(cat "$CACHE/CONFIG")" == "$CONFIG" ]] || return 1
    for target in "${TARGETS[@]}"; do [[ -x "$CACHE/build/bin/$target" ]] || return 1; done
}
paths() {
    local target
    for target in "${TARGETS[@]}"; do echo "$CACHE/build/bin/$target"; done
}

if built; then
    echo "already built: ${TARGETS[*]} in $CACHE/build/bin ($CONFIG)" >&2
    paths
    exit 0
fi

mkdir -p "$CACHE/sdist"
if ! compgen -G "$CACHE/sdist/llama_cpp_python-*.tar.gz" >/dev/null; then
    spec="llama-cpp-python${VERSION:+==$VERSION}"
    echo "downloading the $spec sdist into $CACHE/sdist" >&2
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --dest "$CACHE/sdist" "$spec"
fi
SDIST="$(ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz | sort -V | tail -n 1)"

SRC="$CACHE/src"
if [[ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]]; then
    rm -rf "$SRC" "$CACHE/unpack"
    mkdir -p "$CACHE/unpack"
    tar -xzf "$SDIST" -C "$CACHE/unpack"
    mv "$CACHE"/unpack/llama_cpp_python-* "$SRC"
    rmdir "$CACHE/unpack"
fi
basename "$SDIST" .tar.gz > "$CACHE/SOURCE"

start=$(date +%s)
# shellcheck disable=SC2086 # CONFIG is a list of arguments
nice -n 19 cmake -S "$SRC/vendor/llama.cpp" -B "$CACHE/build" $CONFIG >&2
nice -n 19 cmake --build "$CACHE/build" --config Release --target "${TARGETS[@]}" -j "$JOBS" >&2
end=$(date +%s)
echo "$CONFIG" > "$CACHE/CONFIG"
echo "built ${TARGETS[*]} from $(cat "$CACHE/SOURCE") in $((end - start)) s ($CONFIG)" >&2
echo "$((end - start))" > "$CACHE/BUILD_SECONDS"
paths
