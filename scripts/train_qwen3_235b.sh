#!/usr/bin/env bash
# Free-Module LoRA on qwen3-235b-a22b with Megatron-Bridge (recipe layout: see freelm/training/megatron_plan.py PRESETS).
# The run comes from the environment, e.g.
#   model_path=/models/qwen3-235b-a22b train_fp=/data/freelm_sft.jsonl output_dir=/runs run_name=free-qwen3-235b-a22b \
#     [nemo_path=/ckpt/qwen3-235b-a22b-mbridge] [train_iters=1000] [save_interval=100] scripts/train_qwen3_235b.sh
# scripts/train_freelm.sh --help lists every variable; an empty required one is an error.
set -euo pipefail
# shellcheck disable=SC1091  # scripts/lib/training.bash: train_model
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/training.bash"
train_model qwen3-235b-a22b 8 "$@"
