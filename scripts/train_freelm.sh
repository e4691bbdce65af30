#!/usr/bin/env bash
# Shared launcher behind scripts/train_qwen3_*.sh: lay out the SFT data (once), optionally convert
# the base model (once), then start megatron/finetune_freelm.py on every GPU with torchrun, directly
# or under Slurm. For ONE node (CPU, one GPU or all GPUs of a node) without Megatron, use `freelm train`
# (TRL + PEFT) instead: `scripts/train_freelm.sh --help` shows both ways to launch it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: PRESET=qwen3-8b|qwen3-30b-a3b|qwen3-235b-a22b scripts/train_freelm.sh [--dry-run] [-- EXTRA_ARGS...]
       (normally called through scripts/train_qwen3_8b.sh, train_qwen3_30b_a3b.sh, train_qwen3_235b.sh)

Required (environment or the calling script):
  model_path     local HF directory of the base model (config, tokenizer, weights); the Megatron-Bridge
                 recipe is built from it (no Hub access) and, without nemo_path, its weights are loaded directly
  train_fp       SFT JSONL: {"prompt": ..., "completion": "[...]<|im_end|>"} per line
  output_dir     where <run_name>/{data,checkpoints,tb_logs} go
  run_name       name of this run
Optional:
  nemo_path      Megatron checkpoint dir to load the base from instead (faster start on many nodes);
                 created from model_path by scripts/convert_hf_to_mbridge.py if set and missing
  train_iters (1000)  save_interval (100)  seq_length (8192)  global_batch_size (32)  lr (1e-4)
  lora_dim (8)  lora_alpha (16)  wandb_project
  NNODES  GPUS_PER_NODE  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
Under Slurm (SLURM_JOB_ID set) the job's node list gives NNODES/MASTER_ADDR and srun starts
one torchrun per node. Otherwise run this script on every node with its NODE_RANK.
--dry-run prints the resolved plan and the launch command without starting anything.
Anything after -- goes to megatron/finetune_freelm.py (e.g. -- --tp 8 --lora-targets linear_qkv).

One node without Megatron (freelm train: TRL SFTTrainer + PEFT; same SFT JSONL, same adapter format):
  all GPUs, DDP:     accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 8 \
                       -m freelm.cli train --model DIR --data SFT.jsonl --output-dir OUT [freelm train flags]
  larger bases:      the same with configs/accelerate/fsdp.yaml (FSDP, full shard) or zero3.yaml (DeepSpeed ZeRO-3)
  torchrun instead:  torchrun --nproc-per-node 8 -m freelm.cli train --model DIR --data SFT.jsonl --output-dir OUT
  --batch-size is per process: the step is batch_size x grad_accum x processes rows (docs/training.md).
EOF
}

# shellcheck disable=SC1091  # scripts/lib/options.bash: parse_options
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/options.bash"
dry_run=0 extra=()
parse_options "--dry-run --" "$@"

: "${PRESET:?PRESET is not set (qwen3-8b, qwen3-30b-a3b or qwen3-235b-a22b)}"
: "${model_path:?model_path is not set: local HF directory of the base model}"
: "${train_fp:?train_fp is not set: the SFT JSONL file}"
: "${output_dir:?output_dir is not set}"
: "${run_name:?run_name is not set}"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python_bin="${PYTHON:-python}"

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:?SLURM_JOB_NUM_NODES is not set}}"
  MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}" | head -n 1)}"
fi
NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

args=(
  --preset "$PRESET"
  --model-path "$model_path" --nemo-path "${nemo_path:-}" --train-fp "$train_fp"
  --output-dir "$output_dir" --run-name "$run_name"
  --nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE"
  --train-iters "${train_iters:-1000}" --save-interval "${save_interval:-100}"
  --seq-length "${seq_length:-8192}" --global-batch-size "${global_batch_size:-32}" --lr "${lr:-1e-4}"
  --lora-dim "${lora_dim:-8}" --lora-alpha "${lora_alpha:-16}"
)
if [[ -n "${wandb_project:-}" ]]; then args+=(--wandb-project "$wandb_project"); fi
args+=("${extra[@]}")
entry="$repo/megatron/finetune_freelm.py"

# Validate the whole plan before anything heavy runs (no Megatron import).
"$python_bin" "$entry" --dry-run "${args[@]}" >"${TMPDIR:-/tmp}/freelm_plan_$$.json" || {
  echo "error: the plan is invalid (see above)" >&2; exit 2; }

torchrun_cmd=(torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")

if [[ "$dry_run" == 1 ]]; then
  cat "${TMPDIR:-/tmp}/freelm_plan_$$.json"
  echo "launch: ${torchrun_cmd[*]} --node-rank \$NODE_RANK $entry ${args[*]}"
  rm -f "${TMPDIR:-/tmp}/freelm_plan_$$.json"
  exit 0
fi
rm -f "${TMPDIR:-/tmp}/freelm_plan_$$.json"

layout="$output_dir/$run_name/data/layout.json"
if [[ -n "${SLURM_JOB_ID:-}" || "$NODE_RANK" == 0 ]]; then
  if [[ -n "${nemo_path:-}" && ! -e "$nemo_path" ]]; then
    "$python_bin" "$repo/scripts/convert_hf_to_mbridge.py" --input "$model_path" --output "$nemo_path"
  fi
  "$python_bin" "$entry" --prepare-data "${args[@]}"
else
  # Other nodes of a manual multi-node launch wait for node 0's data layout (shared filesystem).
  for _ in $(seq 1 720); do [[ -e "$layout" ]] && break; sleep 5; done
  [[ -e "$layout" ]] || { echo "error: $layout did not appear; is node 0 running on a shared filesystem?" >&2; exit 1; }
fi

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  # One torchrun per node; the c10d rendezvous assigns node ranks, so no per-node NODE_RANK is needed.
  srun --nodes "$NNODES" --ntasks-per-node 1 \
    torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" \
    "$entry" "${args[@]}"
else
  exec "${torchrun_cmd[@]}" --node-rank "$NODE_RANK" "$entry" "${args[@]}"
fi
