#!/usr/bin/env bash
# Build llama.cpp's llama-server (C++, OpenAI-compatible, CPU) for the real-server test tier (tests/realserver/).
# The source is the llama.cpp tree bundled in the llama-cpp-python sdist, fetched with pip (PyPI is reachable where
# GitHub is not); only the llama-server target is built. Idempotent: a finished build in the cache is reused.
# Prints the binary's path on the last line of stdout. Needs cmake and a C++ compiler (.ci/run installs them).
#   FREELM_LLAMA_DIR   cache directory (default: .cache/llama-server, git-ignored)
#   --force            rebuild even if the binary exists
# The instruction set is fixed rather than native: a CPU that advertises AMX but faults on it makes a native
# build segfault on the first request.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,9p' "$0"; exit 0
fi
VERSION=0.3.36
CACHE=${FREELM_LLAMA_DIR:-.cache/llama-server}
BIN="$CACHE/build-$VERSION/bin/llama-server"
if [[ -x "$BIN" && "${1:-}" != "--force" ]]; then
  echo "$BIN"; exit 0
fi
for tool in cmake g++; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install cmake g++)" >&2; exit 3; }
done
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
mkdir -p "$CACHE"
SRC="$CACHE/llama_cpp_python-$VERSION"
if [[ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: -d "$CACHE" "llama-cpp-python==$VERSION" >&2
  tar -xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
fi
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
started=$(date +%s)
cmake -S "$SRC/vendor/llama.cpp" -B "$CACHE/build-$VERSION" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$CACHE/build-$VERSION" --target llama-server -j "$(nproc)" >&2
echo "built llama-server $VERSION in $(( $(date +%s) - started ))s" >&2
echo "$BIN"
