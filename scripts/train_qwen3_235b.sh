#!/usr/bin/env bash
# Free-Module LoRA on qwen3-235b-a22b with Megatron-Bridge (recipe layout: see freelm/training/megatron_plan.py PRESETS).
# Set the variables below (edit the defaults after :-) or in the environment;
# scripts/train_freelm.sh --help lists them all. An empty required variable is an error.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  echo "Usage: [model_path=... [nemo_path=...] train_fp=... output_dir=... run_name=...] $0 [--dry-run] [-- EXTRA_ARGS...]"
  echo "Trains the Free-Module LoRA on qwen3-235b-a22b (default: 8 node(s) x 8 GPUs)."
  exec "$(dirname "${BASH_SOURCE[0]}")/train_freelm.sh" --help
fi
export PRESET=qwen3-235b-a22b
export model_path="${model_path:-}"   # e.g. /models/qwen3-235b-a22b
export nemo_path="${nemo_path:-}"     # optional, e.g. /ckpt/qwen3-235b-a22b-mbridge (default: HF weights)
export train_fp="${train_fp:-}"       # e.g. /data/freelm_sft.jsonl
export output_dir="${output_dir:-}"   # e.g. /runs
export run_name="${run_name:-}"       # e.g. free-qwen3-235b-a22b
export train_iters="${train_iters:-1000}"
export save_interval="${save_interval:-100}"
export NNODES="${NNODES:-8}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
exec "$(dirname "${BASH_SOURCE[0]}")/train_freelm.sh" "$@"
