#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama-cpp-python sdist on PyPI (its vendor/llama.cpp), for
# `make bench-peers`. Everything lives under .cache/llama.cpp/ in the repository; a second run reuses it.
# CPU only (no CUDA), no curl, no web UI, no network at build time, -DGGML_NATIVE=ON, Release. Low priority: nice -n 19, $JOBS jobs (default 2).
# Never run in CI: it downloads the sdist and takes ~15+ minutes on 2 cores.
# Prints the path of the llama-server binary on its last line.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="$ROOT/.cache/llama.cpp"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-2}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-}"   # empty: the newest sdist
BIN="$CACHE/build/bin/llama-server"

if [[ -x "$BIN" ]]; then
    echo "llama-server already built: $BIN" >&2
    echo "$BIN"
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
nice -n 19 cmake -S "$SRC/vendor/llama.cpp" -B "$CACHE/build" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_CUDA=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2
nice -n 19 cmake --build "$CACHE/build" --config Release --target llama-server -j "$JOBS" >&2
end=$(date +%s)
echo "built $BIN from $(cat "$CACHE/SOURCE") in $((end - start)) s" >&2
echo "$((end - start))" > "$CACHE/BUILD_SECONDS"
echo "$BIN"
