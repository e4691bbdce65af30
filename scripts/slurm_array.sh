#!/usr/bin/env bash
# One runner.py run split over a Slurm job array: array task I of N runs shard I (--num-shards N --shard-index I).
#
#   sbatch --array=0-3 scripts/slurm_array.sh --data 'bench/*.jsonl' --output runs/freelm.jsonl \
#          --endpoints-file endpoints.txt --tokenizer /models/Qwen3-8B [other runner.py flags]
#   # after all tasks: python3 eval_passk.py --input "Free()LM=runs/freelm.jsonl"   (reads the 4 shards as one run)
#
# N is the array's task count and I the task id; the array must be --array=0-(N-1). Each task writes
# runs/freelm.shard-I-of-N.jsonl (+ manifest). A failed task resumes its own shard when rerun; a rerun
# array of other size must keep N: NUM_SHARDS=4 sbatch --export=ALL,NUM_SHARDS=4 --array=2 scripts/slurm_array.sh ...
# Outside Slurm set NUM_SHARDS and SHARD_INDEX. FREELM_REPO is the checkout (default: this script's, else
# the submit directory, since sbatch runs a copy of the script); PYTHON the interpreter (default python3).
# --dry-run prints the runner command instead of running it.
#SBATCH --job-name=freelm-run
#SBATCH --cpus-per-task=4
#SBATCH --time=24:00:00
set -euo pipefail

usage() { sed -n '2,13p' "$0"; exit "${1:-2}"; }
[[ ${1:-} == -h || ${1:-} == --help ]] && usage 0
dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
[[ $# -gt 0 ]] || usage

num_shards=${NUM_SHARDS:-${SLURM_ARRAY_TASK_COUNT:-}}
shard_index=${SHARD_INDEX:-${SLURM_ARRAY_TASK_ID:-}}
if [[ -z $num_shards || -z $shard_index ]]; then
  echo "not a Slurm array task: submit with sbatch --array=0-(N-1), or set NUM_SHARDS and SHARD_INDEX" >&2
  exit 2
fi
if [[ -n ${SLURM_ARRAY_TASK_MIN:-} && -z ${NUM_SHARDS:-} && $SLURM_ARRAY_TASK_MIN != 0 ]]; then
  echo "the array starts at $SLURM_ARRAY_TASK_MIN: use --array=0-(N-1), or set NUM_SHARDS to rerun some tasks" >&2
  exit 2
fi

repo=${FREELM_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
[[ -f $repo/runner.py || -z ${SLURM_SUBMIT_DIR:-} ]] || repo=$SLURM_SUBMIT_DIR
[[ -f $repo/runner.py ]] || { echo "runner.py not found in $repo: set FREELM_REPO to the freelm checkout" >&2; exit 2; }

command=("${PYTHON:-python3}" "$repo/runner.py" "$@" --num-shards "$num_shards" --shard-index "$shard_index" --no-progress)
echo "shard $shard_index of $num_shards on $(hostname)" >&2
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
exec "${command[@]}"
