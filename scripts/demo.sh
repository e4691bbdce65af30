#!/usr/bin/env bash
# The main job on the embedded default: installs a CPU venv (scripts/setup.sh), then runs
# runner.py (vanilla and Free()LM, in-process backend), eval_passk.py and the trace viewer
# on the synthetic long-horizon benchmark, and prints the paper-format tables.
#   bash scripts/demo.sh [--engine local|vllm] [--out DIR] [--problems N] [--large-problems N]   (freelm demo --help)
#   --engine vllm: the same runs through a vLLM server it starts and stops (install: bash scripts/setup_vllm.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,6p' "$0"; exit 0
fi
bash scripts/setup.sh
OMP_NUM_THREADS=1 exec .venv/bin/freelm demo "$@"
