#!/usr/bin/env bash
# Build llama.cpp's llama-server from the sources vendored in the llama-cpp-python sdist.
#
# The build lives outside the repo (never commit it): $TESSERA_BENCH_CACHE, by default
# ~/.cache/tessera-bench. Prints the path of the binary on its last line. Idempotent: a binary
# that is already there is reused. About 15-20 minutes on 2 cores; run it under `nice -n 19`.
set -euo pipefail

CACHE="${TESSERA_BENCH_CACHE:-$HOME/.cache/tessera-bench}"
PYTHON="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"
JOBS="${JOBS:-2}"
BIN="$CACHE/llama.cpp/build/bin/llama-server"

if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE/sdist"
if ! ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: --dest "$CACHE/sdist" llama-cpp-python
fi
SDIST="$(ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz | sort | tail -n 1)"

if [[ ! -d "$CACHE/llama.cpp" ]]; then
    tmp="$(mktemp -d "$CACHE/unpack.XXXXXX")"
    tar -xzf "$SDIST" -C "$tmp"
    mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$CACHE/llama.cpp"
    basename "$SDIST" > "$CACHE/llama.cpp/TESSERA_SDIST"
    rm -rf "$tmp"
fi

cd "$CACHE/llama.cpp"
cmake -B build -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
    -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build build --target llama-server -j"$JOBS"
echo "$BIN"
